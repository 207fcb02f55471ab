"""Streaming load generator for any OpenAI-compatible server.

Sends `requests` streaming chat/completions requests with at most `concurrency` in flight and measures,
from the client's side of the socket, what a user would feel: time to first token (TTFT), inter-token
latency (ITL), per-stream decode speed and aggregate throughput. `--sweep 1,2,4,8,16` runs one level
after another and prints them as one table; `--pid` samples the server's RSS during each level.
`--workload shared-prefix|multi-turn|long-prompt|distinct` runs one of the KV-reuse workloads of
`shrinkserve.server.tools.workloads` instead of the one repeated prompt.

Usage: ``shrinkserve bench --url http://host:8000/v1 --model NAME [--sweep 1,2,4,8,16]`` (also
``python -m shrinkserve.server.tools.bench``); any OpenAI-compatible server works.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

Api = Literal["chat", "completions"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle washed up on the "
    "rocks after a storm. Describe the keeper, the message, and what the keeper decides to do next."
)


def default_prompt(api: Api) -> str:
    """The default prompt; a raw completion of a sentence ending in "." often starts with EOS, a newline
    cue makes small models answer instead."""
    return DEFAULT_PROMPT if api == "chat" else DEFAULT_PROMPT + "\n"


# Only the first few distinct error messages are kept: a dead server fails every request alike.
MAX_ERRORS_KEPT = 5


# --------------------------------------------------------------------------------------------------
# SSE parsing
# --------------------------------------------------------------------------------------------------


class SSEDecoder:
    """Incremental Server-Sent-Events decoder: feed raw bytes, get the `data` payload of each event.

    Bytes arrive split at arbitrary points (even inside a UTF-8 sequence or a CRLF), so lines are
    reassembled here rather than trusting chunk boundaries. Per the SSE spec an event ends at a blank
    line and several `data:` lines of one event are joined with newlines.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events: list[str] = []
        while True:
            line, sep, rest = self._split_line(self._buf)
            if not sep:
                return events
            self._buf = rest
            event = self._handle_line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)

    def flush(self) -> list[str]:
        """Events still pending when the stream closes (a server may omit the final blank line)."""
        events = self.feed(b"\n") if self._buf else []
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    @staticmethod
    def _split_line(buf: bytes) -> tuple[bytes, bytes, bytes]:
        """(line, separator, rest); separator is b"" when no complete line is buffered yet."""
        hits = [i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0]
        if not hits:
            return buf, b"", b""
        i = min(hits)
        if buf[i] == 0x0D:  # \r or \r\n; a trailing lone \r may be the first half of \r\n, so wait
            if i + 1 == len(buf):
                return buf, b"", b""
            sep_len = 2 if buf[i + 1] == 0x0A else 1
            return buf[:i], buf[i : i + sep_len], buf[i + sep_len :]
        return buf[:i], b"\n", buf[i + 1 :]

    def _handle_line(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            event, self._data = "\n".join(self._data), []
            return event
        if line.startswith(":"):  # comment / keep-alive ping
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None  # event:, id:, retry: carry nothing the benchmark needs


@dataclass
class ChunkInfo:
    """What one `data:` payload contributes to the measurement."""

    text: str = ""
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server reports it
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False


def parse_chunk(data: str, api: Api) -> ChunkInfo:
    """Extract generated text, usage and in-band errors from one SSE data payload."""
    if data.strip() == "[DONE]":
        return ChunkInfo(done=True)
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        return ChunkInfo(error=f"unparsable SSE data: {data[:200]!r}")
    if not isinstance(obj, dict):
        return ChunkInfo(error=f"unexpected SSE data: {data[:200]!r}")
    if obj.get("error"):
        return ChunkInfo(error=f"server error in stream: {json.dumps(obj['error'])[:300]}")
    info = ChunkInfo()
    usage = obj.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        info.completion_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            info.prompt_tokens = usage["prompt_tokens"]
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            info.cached_tokens = details["cached_tokens"]
    # The include_usage chunk has `choices: []`; the text lives in the first choice (n=1 always here).
    choices = obj.get("choices") or []
    if choices and isinstance(choices[0], dict):
        choice = choices[0]
        info.finish_reason = choice.get("finish_reason")
        if api == "chat":
            info.text = (choice.get("delta") or {}).get("content") or ""
        else:
            info.text = choice.get("text") or ""
    return info


# --------------------------------------------------------------------------------------------------
# Per-request measurement
# --------------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """Timings of one request, all as time.perf_counter() values."""

    t_start: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each non-empty text chunk
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""  # the generated text (a multi-turn workload sends it back as the assistant's turn)
    finish_reason: str | None = None
    t_end: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.t_start if self.chunk_times else None

    @property
    def tokens(self) -> int:
        # Servers may pack several tokens into one chunk, so usage (when sent) is the truth.
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunk_times)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def decode_tps(self) -> float | None:
        """(tokens-1)/(last-first): the first token belongs to prefill, so it is excluded."""
        if len(self.chunk_times) < 2 or self.tokens < 2:
            return None
        span = self.chunk_times[-1] - self.chunk_times[0]
        return (self.tokens - 1) / span if span > 0 else None


def consume_events(record: RequestRecord, events: Iterable[str], api: Api, now: float) -> bool:
    """Apply decoded SSE payloads that arrived at `now` to `record`. Returns True once [DONE] is seen."""
    for data in events:
        info = parse_chunk(data, api)
        if info.done:
            return True
        if info.error:
            record.error = info.error
            return True
        if info.completion_tokens is not None:
            record.usage_tokens = info.completion_tokens
            record.prompt_tokens = info.prompt_tokens
            record.cached_tokens = info.cached_tokens
        if info.finish_reason:
            record.finish_reason = info.finish_reason
        if info.text:
            record.chunk_times.append(now)
            record.text += info.text
    return False


def build_request(
    api: Api,
    model: str,
    prompt: str,
    max_tokens: int,
    temperature: float,
    ignore_eos: bool,
) -> tuple[str, dict[str, Any]]:
    """Endpoint path and JSON body for one streaming request."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/completions"
    # Not OpenAI; only sent on request so strict servers don't reject the body.
    if ignore_eos:
        body["ignore_eos"] = True
    return path, body


async def read_stream(resp: httpx.Response, record: RequestRecord, api: Api) -> None:
    """Consume an SSE response body into `record`, stamping each read with its arrival time."""
    decoder = SSEDecoder()
    async for raw in resp.aiter_bytes():
        if consume_events(record, decoder.feed(raw), api, time.perf_counter()):
            return
    if consume_events(record, decoder.flush(), api, time.perf_counter()):
        return
    if record.error is None:
        # A stream cut short (server crash, proxy timeout) must not pass as a short answer.
        record.error = "stream closed before data: [DONE]"


async def send_one(client: httpx.AsyncClient, url: str, body: dict[str, Any], api: Api) -> RequestRecord:
    """Issue one streaming request and time every text chunk as it arrives off the socket."""
    record = RequestRecord(t_start=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode("utf-8", errors="replace")[:300]
                record.error = f"HTTP {resp.status_code}: {detail}"
            else:
                await read_stream(resp, record, api)
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.t_end = time.perf_counter()
    if record.error is None:
        record.error = validate_complete(record)
    return record


def validate_complete(record: RequestRecord) -> str | None:
    """Reject streams that ended cleanly but carry nothing trustworthy to measure."""
    if record.finish_reason is None:
        # e.g. llama_cpp.server with interrupt_requests=True ends a stream early when another arrives.
        return f"stream ended without a finish_reason after {len(record.chunk_times)} text chunks (interrupted?)"
    if not record.chunk_times:
        # EOS as first token: counted as ok it would silently drag tok/s down.
        return f"no text generated (finish_reason={record.finish_reason}); try another prompt or --ignore-eos"
    return None


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class BenchResult:
    """Summary of one run. Latencies in seconds; None where no request produced the data."""

    api: str
    concurrency: int
    requests: int
    max_tokens: int
    requests_ok: int
    requests_failed: int
    wall_time_s: float
    total_output_tokens: int
    usage_reported: bool  # token counts came from usage.completion_tokens on every ok request
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    itl_p50_s: float | None
    itl_p95_s: float | None
    decode_tps_per_stream: float | None
    aggregate_tps: float | None
    errors: list[str] = field(default_factory=list)
    server_rss_max_bytes: int | None = None  # with --pid: the server's peak RSS while this run lasted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    records: Sequence[RequestRecord], *, api: str, concurrency: int, max_tokens: int, wall_time_s: float
) -> BenchResult:
    """Reduce per-request records to the BenchResult statistics. Failed requests count only as failures."""
    ok = [r for r in records if r.ok]
    ttfts = [t for r in ok if (t := r.ttft) is not None]
    itls = [gap for r in ok for gap in r.itls]  # pooled: every gap of every stream weighs the same
    decode = [d for r in ok if (d := r.decode_tps) is not None]
    total_tokens = sum(r.tokens for r in ok)
    errors = [r.error for r in records if r.error is not None]
    return BenchResult(
        api=api,
        concurrency=concurrency,
        requests=len(records),
        max_tokens=max_tokens,
        requests_ok=len(ok),
        requests_failed=len(records) - len(ok),
        wall_time_s=wall_time_s,
        total_output_tokens=total_tokens,
        usage_reported=bool(ok) and all(r.usage_tokens is not None for r in ok),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        itl_p50_s=percentile(itls, 50),
        itl_p95_s=percentile(itls, 95),
        decode_tps_per_stream=mean(decode),
        aggregate_tps=total_tokens / wall_time_s if wall_time_s > 0 and ok else None,
        errors=list(dict.fromkeys(errors))[:MAX_ERRORS_KEPT],  # distinct messages only
    )


# --------------------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------------------


async def _run_requests(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], api: Api, *, concurrency: int, requests: int
) -> list[RequestRecord]:
    """`concurrency` workers drain a shared counter, so exactly that many requests stay in flight."""
    records: list[RequestRecord] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1  # no await between check and decrement, so no race in asyncio
            records.append(await send_one(client, url, body, api))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    return records


def process_rss(pid: int) -> int | None:
    """Resident set size of a local process (Linux /proc), None if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def _sample_rss(pid: int, peak: list[int], every: float = 0.2) -> None:
    while True:
        rss = process_rss(pid)
        if rss is not None and rss > peak[0]:
            peak[0] = rss
        await asyncio.sleep(every)


async def run_bench(
    base_url: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompt: str,
    api: Api = "chat",
    temperature: float = 0.0,
    timeout: float = 600,
    ignore_eos: bool = False,
    warmup: int = 0,
    pid: int | None = None,
) -> BenchResult:
    """Run the load and summarize it. `warmup` requests go first, one at a time, and are not counted."""
    if concurrency < 1 or requests < 1 or max_tokens < 1:
        raise ValueError("concurrency, requests and max_tokens must all be >= 1")
    path, body = build_request(api, model, prompt, max_tokens, temperature, ignore_eos)
    url = base_url.rstrip("/") + path
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        for _ in range(warmup):
            rec = await send_one(client, url, body, api)
            if rec.error:
                print(f"warmup request failed: {rec.error}", file=sys.stderr)
        peak = [0]
        sampler = asyncio.ensure_future(_sample_rss(pid, peak)) if pid is not None else None
        t0 = time.perf_counter()
        try:
            records = await _run_requests(client, url, body, api, concurrency=concurrency, requests=requests)
        finally:
            if sampler is not None:
                sampler.cancel()
        wall = time.perf_counter() - t0
    result = summarize(records, api=api, concurrency=concurrency, max_tokens=max_tokens, wall_time_s=wall)
    result.server_rss_max_bytes = peak[0] or None
    return result


# --------------------------------------------------------------------------------------------------
# Presentation / CLI
# --------------------------------------------------------------------------------------------------


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def fmt_num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def result_rows(r: BenchResult) -> list[tuple[str, str]]:
    """(metric, value) pairs shared by the single-run table and side-by-side comparisons."""
    token_source = "usage" if r.usage_reported else "chunks"
    return [
        ("requests ok / failed", f"{r.requests_ok} / {r.requests_failed}"),
        ("TTFT p50 / p95 (ms)", f"{fmt_ms(r.ttft_p50_s)} / {fmt_ms(r.ttft_p95_s)}"),
        ("ITL p50 / p95 (ms)", f"{fmt_ms(r.itl_p50_s)} / {fmt_ms(r.itl_p95_s)}"),
        ("decode tok/s per stream", fmt_num(r.decode_tps_per_stream)),
        ("aggregate tok/s", fmt_num(r.aggregate_tps)),
        ("output tokens", f"{r.total_output_tokens} ({token_source})"),
        ("wall time (s)", fmt_num(r.wall_time_s, 2)),
        *([("server RSS peak (MiB)", f"{r.server_rss_max_bytes / 2**20:.0f}")] if r.server_rss_max_bytes else []),
    ]


def format_result(result: BenchResult, label: str) -> str:
    """Compact human-readable table of one run."""
    head = (
        f"{label}: api={result.api} concurrency={result.concurrency} "
        f"requests={result.requests} max_tokens={result.max_tokens}"
    )
    rows = result_rows(result)
    width = max(len(name) for name, _ in rows)
    lines = [head] + [f"  {name:<{width}}  {value}" for name, value in rows]
    lines += [f"  error: {err}" for err in result.errors]
    return "\n".join(lines)


def format_sweep(results: Sequence[BenchResult], label: str) -> str:
    """One row per concurrency level: per-stream and aggregate tok/s, TTFT and ITL percentiles, RSS."""
    base = results[0].aggregate_tps if results and results[0].concurrency == 1 else None
    head = (f"{label}: api={results[0].api} max_tokens={results[0].max_tokens}\n" if results else "") + (
        "| streams | requests ok/failed | per-stream tok/s | aggregate tok/s | vs 1 stream | TTFT p50 / p95 (ms) "
        "| ITL p50 / p95 (ms) | server RSS (MiB) |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        ratio = f"{r.aggregate_tps / base:.2f}x" if base and r.aggregate_tps else "-"
        rss = f"{r.server_rss_max_bytes / 2**20:.0f}" if r.server_rss_max_bytes else "-"
        rows.append(f"| {r.concurrency} | {r.requests_ok}/{r.requests_failed} | {fmt_num(r.decode_tps_per_stream)} | "
                    f"{fmt_num(r.aggregate_tps)} | {ratio} | {fmt_ms(r.ttft_p50_s)} / {fmt_ms(r.ttft_p95_s)} | "
                    f"{fmt_ms(r.itl_p50_s)} / {fmt_ms(r.itl_p95_s)} | {rss} |")
    errors = [f"error ({r.concurrency} streams): {e}" for r in results for e in r.errors]
    return "\n".join([head, *rows, *errors])


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep takes comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("--sweep levels must be >= 1")
    return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shrinkserve bench", description="Streaming load test of an OpenAI-compatible server."
    )
    p.add_argument("--base-url", "--url", dest="base_url", default=DEFAULT_BASE_URL,
                   help="API root incl. /v1 (default: %(default)s)")
    p.add_argument("--model", required=True, help="model name to request")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (default: 1)")
    p.add_argument("--sweep", type=parse_levels, metavar="N,N,...",
                   help="run these concurrency levels one after another (e.g. 1,2,4,8,16) instead of --concurrency")
    p.add_argument("--requests", type=int, default=None,
                   help="total requests per level (default: 4 x concurrency; 2 x concurrency in a sweep)")
    p.add_argument("--pid", type=int, help="server process id (local): report its peak RSS per level")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default: 128)")
    p.add_argument("--prompt", default=None, help="prompt / user message (default: a short-story request)")
    p.add_argument("--api", choices=["chat", "completions"], default="chat", help="endpoint (default: chat)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0)")
    # nargs="?" so both a bare `--warmup` and `--warmup N` work; 0 disables.
    p.add_argument(
        "--warmup",
        type=int,
        nargs="?",
        const=1,
        default=1,
        help="uncounted requests sent first (default: 1; `--warmup 0` disables)",
    )
    p.add_argument("--ignore-eos", action="store_true", help='send "ignore_eos": true (not OpenAI)')
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in s (default: 600)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--workload", choices=["standard", "shared-prefix", "multi-turn", "long-prompt", "distinct"],
                   default="standard", help="standard: one repeated prompt (the options above); the others are "
                   "described in the docstring of shrinkserve/server/tools/workloads.py (default: %(default)s)")
    p.add_argument("--waves", type=int, default=3, help="shared-prefix: waves of --concurrency chats (default: 3)")
    p.add_argument("--turns", type=int, default=6, help="multi-turn: turns per conversation (default: 6)")
    p.add_argument("--long-words", type=int, default=5400,
                   help="long-prompt: words in the long prompt (~1.1 tokens each; default: 5400)")
    return p


def run_workload_cli(args: argparse.Namespace) -> int:
    """One KV-reuse workload (--max-tokens applies to its requests; 32 suits the question workloads)."""
    from shrinkserve.server.tools.workloads import WorkloadOptions, format_workload, run_workload

    o = WorkloadOptions(model=args.model, concurrency=args.concurrency, max_tokens=args.max_tokens,
                        ignore_eos=args.ignore_eos, waves=args.waves, turns=args.turns, long_words=args.long_words)
    try:
        result = asyncio.run(run_workload(args.base_url, args.workload, o, timeout=args.timeout, warmup=args.warmup))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_workload(result, args.model))
    return 0 if result.summary.requests_failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. Exit code 0 when every counted request succeeded, 1 otherwise."""
    args = build_parser().parse_args(argv)
    if args.workload != "standard":
        return run_workload_cli(args)
    levels = args.sweep or [args.concurrency]

    async def run_all() -> list[BenchResult]:
        out = []
        for i, level in enumerate(levels):
            default = (2 if args.sweep else 4) * level
            out.append(await run_bench(
                args.base_url, args.model, concurrency=level,
                requests=args.requests if args.requests is not None else default, max_tokens=args.max_tokens,
                prompt=args.prompt if args.prompt is not None else default_prompt(args.api), api=args.api,
                temperature=args.temperature, timeout=args.timeout, ignore_eos=args.ignore_eos,
                warmup=args.warmup if i == 0 else 0, pid=args.pid))
            if args.sweep and not args.json:
                print(f"  {level} streams: {fmt_num(out[-1].aggregate_tps)} tok/s aggregate", file=sys.stderr)
        return out

    try:
        results = asyncio.run(run_all())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        doc = {"sweep": [r.to_dict() for r in results]} if args.sweep else results[0].to_dict()
        print(json.dumps(doc, indent=2))
    elif args.sweep:
        print(format_sweep(results, args.model))
    else:
        print(format_result(results[0], args.model))
    return 0 if all(r.requests_failed == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
