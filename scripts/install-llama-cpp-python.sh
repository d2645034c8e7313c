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
# The flags: scripts/llama-cpp-flags.sh (shared with build-llama-tools.sh).
#
# usage: install-llama-cpp-python.sh PIP VERSION
set -euo pipefail
pip_cmd=$1
version=$2
arch=$(uname -m)
source "$(dirname "$0")/llama-cpp-flags.sh"
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
