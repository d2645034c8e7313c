#!/usr/bin/env bash
# Build llama.cpp's own programs (llama-quantize, llama-imatrix,
# llama-perplexity, llama-bench, llama-cli, llama-server) from exactly the
# llama.cpp source the pinned llama-cpp-python binds: its sdist vendors it
# (vendor/llama.cpp). Same portable CPU flags as the Python library, static
# (no shared library to mix up with the wheel's), no network features.
# Built once into a cache directory keyed by version, architecture and flags;
# copied next to the venv's python, where factorport finds them
# (factorport/llamacpp/tools.py; `factorport doctor` lists them).
#
# usage: build-llama-tools.sh PIP VERSION
set -euo pipefail
pip_cmd=$1
version=$2
arch=$(uname -m)
source "$(dirname "$0")/llama-cpp-flags.sh"
tools="llama-quantize llama-imatrix llama-perplexity llama-bench llama-cli llama-server"
cache=${FACTORPORT_CACHE:-$HOME/.cache/factorport}
bin=$(dirname "$pip_cmd")
built="$cache/tools/llama.cpp-$version-$arch-$key"
if [ ! -f "$built/BUILD_INFO" ]; then
  echo "building llama.cpp's tools ($tools) from llama-cpp-python $version's vendored source, portable flags ($arch, key $key); ~11 min on 2 cores, once"
  tmp="$built.partial.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp/src" "$tmp/bin"
  "$pip_cmd" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp/src"
  sdist=$(ls "$tmp"/src/llama_cpp_python-*.tar.gz)
  tar xzf "$sdist" -C "$tmp/src"
  source_dir=$(ls -d "$tmp"/src/llama_cpp_python-*/vendor/llama.cpp)
  if ! command -v cmake >/dev/null; then  # no system CMake: PyPI's, into the venv
    "$pip_cmd" install --quiet cmake ninja
    export PATH="$bin:$PATH"
  fi
  generator=$(command -v ninja >/dev/null && echo Ninja || echo "Unix Makefiles")
  # shellcheck disable=SC2086  # $flags is a list of CMake arguments
  cmake -S "$source_dir" -B "$tmp/build" -G "$generator" -DCMAKE_BUILD_TYPE=Release $flags \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    > "$tmp/configure.log" 2>&1 || { tail -40 "$tmp/configure.log"; exit 1; }
  # shellcheck disable=SC2086
  cmake --build "$tmp/build" --parallel "$(nproc)" --target $tools > "$tmp/build.log" 2>&1 || { tail -40 "$tmp/build.log"; exit 1; }
  for tool in $tools; do cp "$tmp/build/bin/$tool" "$tmp/bin/"; done
  {
    echo "source: llama-cpp-python $version sdist, vendor/llama.cpp"
    echo "sdist_sha256: $(sha256sum "$sdist" | cut -d' ' -f1)"
    echo "flags: $flags"
  } > "$tmp/bin/BUILD_INFO"
  rm -rf "$built"
  mkdir -p "$(dirname "$built")"
  mv "$tmp/bin" "$built"
  rm -rf "$tmp"
fi
for tool in $tools; do cp "$built/$tool" "$bin/$tool"; done
cp "$built/BUILD_INFO" "$bin/llama.cpp-BUILD_INFO"
