#!/usr/bin/env bash
# Prints llama.cpp's CMake instruction-set flags for THIS machine's CPU, read from /proc/cpuinfo: the wheel
# (Makefile) and llama-server (build_llama_server.sh) are compiled with them. A build with AVX-512 on dies
# with SIGILL at its first matmul on a CPU without it (seen: an AMD EPYC with AVX2 only, where the earlier
# fixed AVX-512 flags had run before). GGML_NATIVE stays off so the flags, not the compiler's guess, decide.
set -euo pipefail
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
on() { [[ "$flags" == *" $1 "* ]] && echo ON || echo OFF; }
echo "-DGGML_NATIVE=OFF -DGGML_AVX=$(on avx) -DGGML_AVX2=$(on avx2) -DGGML_FMA=$(on fma) -DGGML_F16C=$(on f16c)" \
  "-DGGML_AVX512=$(on avx512f) -DGGML_AVX512_VBMI=$(on avx512vbmi) -DGGML_AVX512_VNNI=$(on avx512_vnni)" \
  "-DGGML_AVX512_BF16=$(on avx512_bf16)"
