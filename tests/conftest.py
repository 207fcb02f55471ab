"""Shared fixtures: a real `shrinkserve serve` process on a free loopback port, on the real model."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHRINKSERVE = [sys.executable, "-m", "shrinkserve.server.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`shrinkserve serve` as a subprocess; stopped (and its log shown on failure) by the fixture."""

    def __init__(self, config: dict, cache_dir: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = log_path.with_suffix(".yaml")
        # Evaluating every profile after load would keep both cores busy under the other tests; the
        # quality tests turn it on in their own configs.
        config = {"evaluation": {"on_build": False}, **config}
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = log_path
        full_env = {**os.environ, "SHRINKSERVE_CACHE_DIR": str(cache_dir), **(env or {})}
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*SHRINKSERVE, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--config", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 600, path: str = "/ready") -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(self.url + path, timeout=5)
                if r.status_code == 200:
                    return r
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-8000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact cache for the session: the base is materialized once, then every server reuses it."""
    return tmp_path_factory.mktemp("cache")


MAIN_CONFIG = {
    "profiles": {
        "base": {"method": "gguf:f16"},
        "q8_0": {"method": "gguf:q8_0"},
        "q4_k_m": {"method": "gguf:q4_k_m"},
        # One slot and no queue (serving.profiles below): what overload looks like.
        "q4-one-slot": {"method": "gguf:q4_k_m", "load": "lazy"},
        "base-torch": {"method": "hf", "dtype": "float32"},
        "q4_0-lazy": {"method": "gguf:q4_0", "load": "lazy"},
        # Weight-only profiles on the PyTorch engine through shrinkserve.kernels, built on first use.
        "int8": {"method": "int8", "load": "lazy", "dtype": "bfloat16"},
        "rtn-g64": {"method": "rtn", "group_size": 64, "lm_head_bits": 8, "load": "lazy"},
        "rtn-g32-sym": {"method": "rtn", "group_size": 32, "symmetric": True, "lm_head_bits": None, "load": "lazy"},
        # AWQ/GPTQ through llm-compressor: minutes each on 2 cores, so a small calibration set. The
        # lm_head stays dense here, so they compare with rtn-g64-dense-head at the same group size.
        "gptq-g64": {"method": "gptq", "group_size": 64, "lm_head_bits": None, "load": "lazy",
                     "calibration": {"samples": 16, "seq_len": 256}},
        "awq-g64": {"method": "awq", "group_size": 64, "lm_head_bits": None, "load": "lazy",
                    "calibration": {"samples": 16, "seq_len": 256}},
        "rtn-g64-dense-head": {"method": "rtn", "group_size": 64, "lm_head_bits": None, "load": "lazy"},
    },
    "routes": {"/q4": "q4_k_m", "/q8": "q8_0", "/one": "q4-one-slot"},
    "serving": {"profiles": {"q4-one-slot": {"max_num_seqs": 1, "max_queue": 0}}},
}


@pytest.fixture(scope="session")
def server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(MAIN_CONFIG, cache_dir, tmp_path_factory.mktemp("logs") / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        code = proc.stop()
        assert code in (0, -signal.SIGTERM), f"server exited with {code} (a crash?):\n{proc.log()}"


# The API tests' server (tests/test_api_features.py, tests/test_api_schemathesis.py): both in-process engines,
# one route, bearer auth on, the default body limit.
API_KEY = "sk-shrinkserve-test"
API_CONFIG = {
    "api_keys": [API_KEY],
    "profiles": {"q8_0": {"method": "gguf:q8_0"}, "torch": {"method": "hf", "dtype": "float32"}},
    "routes": {"/q8": "q8_0"},
    "serving": {"profiles": {"q8_0": {"max_num_seqs": 4}, "torch": {"max_num_seqs": 4}}},
}


@pytest.fixture(scope="session")
def api_server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(API_CONFIG, cache_dir, tmp_path_factory.mktemp("api-logs") / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        code = proc.stop()
        assert code in (0, -signal.SIGTERM), f"server exited with {code} (a crash?):\n{proc.log()}"


# vLLM-CPU loads one of three op libraries by what the CPU has (vllm/platforms/cpu.py): the AVX2 one has no
# 4-bit weight-only GEMM, and a compressed-tensors int4 model then fails at its first forward with
# "'_C' object has no attribute 'cpu_gemm_wna16'" (seen on an AVX2-only AMD EPYC). Checked once per session.
VLLM_INT4_PROBE = ("from vllm.platforms import current_platform; current_platform.import_kernels(); import torch; "
                   "print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))")


@functools.cache
def vllm_int4_missing() -> str | None:
    """Why vLLM-CPU cannot run int4 weight-only layers here, or None when it can."""
    from shrinkserve.compression.engine_options import default_vllm_python

    python = default_vllm_python()
    if not python.exists():
        return f"vLLM venv absent ({python}); `make vllm` creates it"
    r = subprocess.run([str(python), "-c", VLLM_INT4_PROBE], capture_output=True, text=True, timeout=600,
                       cwd=Path.home())
    if r.returncode != 0:
        return f"vLLM-CPU did not import: {r.stderr[-1000:]}"
    if r.stdout.strip().splitlines()[-1] != "True":
        return ("vLLM-CPU has no int4 weight-only kernel on this CPU (no AVX-512: it loads its AVX2 op library, "
                "without cpu_gemm_wna16)")
    return None


def require_vllm_int4() -> None:
    why = vllm_int4_missing()
    if why:
        pytest.skip(why)
