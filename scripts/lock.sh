#!/usr/bin/env bash
# Regenerate the lock files in requirements/ (`make lock`). What a machine installs is only ever what these
# files say: `make setup`, `make vllm` and the Dockerfile install them with --require-hashes --no-deps.
#
#   scripts/lock.sh              # keep every pin the lock already has, change what the inputs require
#   scripts/lock.sh --upgrade    # move everything to the newest versions the inputs allow (then run make test)
#
# Inputs: pyproject.toml (dependencies + the `test` extra), requirements/*.in, requirements/overrides.txt.
# Resolved for CPython 3.11 on x86_64 Linux with glibc 2.36 (Debian 12: these machines and the images' base), the machines and the images we run on. The CPU locks take
# torch 2.13.0+cpu from /opt/wheels (where it lies on these machines; the CPU image gets the same file from
# the PyTorch CPU index); the GPU image's locks take PyPI's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-.venv/bin/uv}"
common=(--quiet --generate-hashes --custom-compile-command "make lock" --python-version 3.11 --python-platform x86_64-manylinux_2_36 "$@")
cpu=(--find-links /opt/wheels)

"$UV" pip compile "${common[@]}" requirements/build.in -o requirements/build.lock.txt
"$UV" pip compile "${common[@]}" "${cpu[@]}" pyproject.toml requirements/main.in --extra test \
  --override requirements/overrides.txt -c requirements/build.lock.txt -o requirements/main.lock.txt
# vLLM imports no torchvision/torchaudio/torchcodec for a text model, and PyPI's builds of them break
# `import vllm` beside the CPU torch ("operator torchvision::nms does not exist"): they stay out. vLLM pins
# its own setuptools, so its venvs take wheels only and build nothing.
"$UV" pip compile "${common[@]}" "${cpu[@]}" requirements/vllm.in --only-binary :all: \
  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec \
  -o requirements/vllm.lock.txt
# The images take the project without its test tools, every version as main.lock.txt has it (the
# versions the suite ran with); the GPU image with PyPI's CUDA build of the same torch release.
# (a fixed name: the lock's annotations mention it, and a temporary name would change them every run)
tested=requirements/main-tested.txt; trap 'rm -f "$tested"' EXIT
grep -v -e '^torch==' requirements/main.lock.txt | sed '/^ *--hash/d; /^ *#/d; s/ *\\$//' > "$tested"
"$UV" pip compile "${common[@]}" "${cpu[@]}" pyproject.toml requirements/main.in \
  --override requirements/overrides.txt -c requirements/main.lock.txt -o requirements/docker-cpu.lock.txt
"$UV" pip compile "${common[@]}" pyproject.toml requirements/main.in \
  --override requirements/overrides.txt -c "$tested" -o requirements/docker-gpu.lock.txt
"$UV" pip compile "${common[@]}" requirements/docker-vllm-gpu.in --only-binary :all: \
  -o requirements/docker-vllm-gpu.lock.txt
echo "locks written: $(ls requirements/*.lock.txt | tr '\n' ' ')"
