#!/usr/bin/env bash
# Install llama-cpp-python built for *any* host of this architecture, never for
# the build machine's CPU.
#
# Why: llama.cpp built with native flags (its default) compiles ggml's AMX and
# AVX-512 kernels whenever the build host's CPU advertises them. Some VMs
# advertise AMX and fault on tile instructions (SIGILL in `tilezero`), and
# pip's wheel cache hands a natively built wheel to whatever machine shares the
# cache. So we build the wheel ourselves with fixed flags, outside pip's cache,
# into a directory keyed by version, architecture and flags, and install that.
#
# x86-64: the x86-64-v3 level (SSE4.2, AVX, AVX2, FMA, F16C, BMI2): no AVX-512,
# no AMX. factorport checks at run time that the CPU has these before llama.cpp
# is loaded (factorport/hostcpu.py). Other architectures: ggml's portable
# baseline (GGML_NATIVE=OFF).
#
# usage: install-llama-cpp-python.sh PIP VERSION
set -euo pipefail
pip_cmd=$1
version=$2
arch=$(uname -m)
case "$arch" in
  x86_64)
    flags="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=OFF"
    ;;
  *)
    flags="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF"
    ;;
esac
key=$(printf '%s' "$flags" | sha256sum | cut -c1-12)
cache=${FACTORPORT_CACHE:-$HOME/.cache/factorport}
wheels="$cache/wheels/llama-cpp-python-$version-$arch-$key"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $version from its sdist, portable flags ($arch, key $key); ~11 min on 2 cores, once"
  tmp="$wheels.partial.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$pip_cmd" wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$version" -w "$tmp"
  printf '%s\n' "$flags" > "$tmp/CMAKE_ARGS"
  rm -rf "$wheels"
  mv "$tmp" "$wheels"
fi
"$pip_cmd" install --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
