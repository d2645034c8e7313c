#!/usr/bin/env bash
# The CMake flags of every llama.cpp factorport builds (the Python library and
# the command-line tools): code for *any* host of this architecture, never for
# the build machine's CPU.
#
# x86-64: the x86-64-v3 level (SSE4.2, AVX, AVX2, FMA, F16C, BMI2): no AVX-512,
# no AMX. factorport checks at run time that the CPU has these before llama.cpp
# is loaded or run (factorport/hostcpu.py). Other architectures: ggml's
# portable baseline (GGML_NATIVE=OFF).
#
# usage: source scripts/llama-cpp-flags.sh  (sets $flags and $key, the flags' cache key)
case "$(uname -m)" in
  x86_64)
    flags="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=OFF"
    ;;
  *)
    flags="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF"
    ;;
esac
key=$(printf '%s' "$flags" | sha256sum | cut -c1-12)
