#!/usr/bin/env bash
# Build llama.cpp's own C++ `llama-server` from the llama.cpp source vendored in llama-cpp-python's sdist
# (the same llama.cpp commit our wheel links), server target only, with the wheel's ISA flags. The binary is
# cached under .cache/llama-server/<version>/ so the ~11 minutes on 2 cores are paid once.
#
#   scripts/build_llama_server.sh            # prints the binary's path (builds it when missing)
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 CACHE_DIR=.cache/llama-server scripts/build_llama_server.sh
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE_DIR="${CACHE_DIR:-$ROOT/.cache/llama-server}"
# The wheel's instruction-set flags (this machine's CPU); the binary is cached per set of them.
ISA_ARGS="$(bash "$ROOT/scripts/llama_isa_args.sh")"
OUT="$CACHE_DIR/$VERSION-$(echo "$ISA_ARGS" | sha256sum | cut -c1-12)"
BIN="$OUT/llama-server"
PYTHON="${PYTHON:-python3}"

if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
  echo "$BIN"
  exit 0
fi

# Same ISA flags as the wheel (AMX off: its int8 path crashed with SIGSEGV on
# these CPUs), plus what a server-only build needs: no web UI download, no curl/openssl (loopback only, local
# files), no tests/examples.
read -r -a ISA <<< "$ISA_ARGS"
CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
  "${ISA[@]}" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON
)

WORK="$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# The sdist from the registry through pip's ordinary client (pip's http cache makes a second fetch free).
"$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$WORK" >&2
SDIST="$(ls "$WORK"/llama_cpp_python-"$VERSION".tar.gz)"
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[[ -d "$SRC/tools/server" ]] || { echo "no tools/server in $SRC" >&2; exit 1; }

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
echo "configuring llama.cpp from $SDIST" >&2
cmake -S "$SRC" -B "$WORK/build" "${GENERATOR[@]}" "${CMAKE_FLAGS[@]}" >&2
echo "building llama-server with $(nproc) jobs (about 11 minutes on 2 cores)" >&2
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >&2

mkdir -p "$OUT"
cp "$WORK/build/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"        # atomic: a half-copied binary is never found by the check above
"$BIN" --version >&2
echo "$BIN"
