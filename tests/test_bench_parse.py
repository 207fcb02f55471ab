"""SSE parsing and statistics of shrinkserve.server.tools.bench, on real byte strings (no network)."""

from __future__ import annotations

import argparse
import asyncio
import os

import httpx
import pytest

from shrinkserve.server.tools import bench

# Shape of a llama_cpp.server / OpenAI chat stream with include_usage, CRLF line ends and a keep-alive.
CHAT_STREAM = (
    b": ping\r\n\r\n"
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\r\n\r\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\r\n\r\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"lo \xc3\xa9"}}]}\r\n\r\n'
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\r\n\r\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)


def decode_in_pieces(raw: bytes, size: int) -> list[str]:
    dec = bench.SSEDecoder()
    events: list[str] = []
    for i in range(0, len(raw), size):
        events += dec.feed(raw[i : i + size])
    return events + dec.flush()


@pytest.mark.parametrize("size", [1, 2, 7, 10_000])
def test_decoder_is_independent_of_read_boundaries(size: int) -> None:
    events = decode_in_pieces(CHAT_STREAM, size)
    assert len(events) == 6
    assert events[-1] == "[DONE]"
    assert bench.parse_chunk(events[2], "chat").text == "lo é"  # UTF-8 split across reads survives


def test_decoder_joins_multiline_data_and_flushes_unterminated_event() -> None:
    assert decode_in_pieces(b"data: a\ndata: b\n\nevent: x\ndata: [DONE]", 3) == ["a\nb", "[DONE]"]


def test_parse_chunk_completions_usage_and_errors() -> None:
    info = bench.parse_chunk('{"choices":[{"text":" world","index":0}]}', "completions")
    assert info.text == " world"
    assert bench.parse_chunk('{"choices":[],"usage":{"completion_tokens":7}}', "chat").completion_tokens == 7
    assert bench.parse_chunk('{"error":{"message":"boom"}}', "chat").error
    assert bench.parse_chunk("not json", "chat").error
    assert bench.parse_chunk("[DONE]", "chat").done


def test_usage_chunk_gives_prompt_and_cached_tokens() -> None:
    usage = ('{"choices":[],"usage":{"prompt_tokens":900,"completion_tokens":3,'
             '"prompt_tokens_details":{"cached_tokens":807}}}')
    info = bench.parse_chunk(usage, "chat")
    assert (info.completion_tokens, info.prompt_tokens, info.cached_tokens) == (3, 900, 807)
    plain = bench.parse_chunk('{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}', "chat")
    assert plain.prompt_tokens == 5 and plain.cached_tokens is None  # a server that does not report it
    rec = bench.RequestRecord(t_start=0.0)
    events = ['{"choices":[{"index":0,"delta":{"content":"Hi"}}]}',
              '{"choices":[{"index":0,"delta":{"content":" there"},"finish_reason":"stop"}]}', usage, "[DONE]"]
    assert bench.consume_events(rec, events, "chat", 1.0)
    assert rec.text == "Hi there" and rec.prompt_tokens == 900 and rec.cached_tokens == 807


def test_workload_prompts_are_deterministic_and_distinct_where_they_must_be() -> None:
    import random

    from shrinkserve.server.tools import workloads

    a, b = workloads.prose(random.Random(1), 50), workloads.prose(random.Random(1), 50)
    assert a == b and len(a.split()) == 50
    assert workloads.prose(random.Random(2), 50) != a
    assert len({workloads.question(i) for i in range(40)}) == 40


def test_record_statistics() -> None:
    # Chunks at 0.5, 0.6, 0.8 s after start; usage says 5 tokens (a server may batch tokens per chunk).
    rec = bench.RequestRecord(t_start=10.0, chunk_times=[10.5, 10.6, 10.8], usage_tokens=5)
    assert rec.ttft == pytest.approx(0.5)
    assert rec.itls == pytest.approx([0.1, 0.2])
    assert rec.decode_tps == pytest.approx(4 / 0.3)
    assert bench.RequestRecord(t_start=0.0, chunk_times=[1.0, 2.0]).tokens == 2  # no usage: count chunks


def test_summarize_percentiles_and_failures() -> None:
    ok1 = bench.RequestRecord(t_start=0.0, chunk_times=[1.0, 2.0, 3.0], usage_tokens=3)
    ok2 = bench.RequestRecord(t_start=0.0, chunk_times=[3.0, 3.5], usage_tokens=2)
    bad = bench.RequestRecord(t_start=0.0, chunk_times=[0.1], error="HTTP 500: x")
    r = bench.summarize([ok1, ok2, bad], api="chat", concurrency=2, max_tokens=3, wall_time_s=5.0)
    assert (r.requests_ok, r.requests_failed, r.total_output_tokens) == (2, 1, 5)
    assert r.ttft_p50_s == pytest.approx(2.0)  # failed request's 0.1 s TTFT is not counted
    assert r.ttft_p95_s == pytest.approx(2.9)
    assert r.itl_p50_s == pytest.approx(1.0)  # gaps pooled: 1.0, 1.0, 0.5
    assert r.decode_tps_per_stream == pytest.approx((1.0 + 2.0) / 2)
    assert r.aggregate_tps == pytest.approx(1.0)
    assert r.usage_reported and r.errors == ["HTTP 500: x"]
    assert "TTFT p50 / p95 (ms)" in bench.format_result(r, "x")


def run_against(transport: httpx.MockTransport, api: bench.Api = "chat") -> bench.RequestRecord:
    async def go() -> bench.RequestRecord:
        async with httpx.AsyncClient(transport=transport) as client:
            _, body = bench.build_request(api, "m", "hi", 3, 0.0, ignore_eos=False)
            return await bench.send_one(client, "http://test/v1/chat/completions", body, api)

    return asyncio.run(go())


def test_send_one_over_mock_transport() -> None:
    rec = run_against(httpx.MockTransport(lambda req: httpx.Response(200, content=CHAT_STREAM)))
    assert rec.ok and rec.tokens == 3 and len(rec.chunk_times) == 2

    truncated = CHAT_STREAM[: CHAT_STREAM.index(b"data: [DONE]")]
    rec = run_against(httpx.MockTransport(lambda req: httpx.Response(200, content=truncated)))
    assert rec.error == "stream closed before data: [DONE]"

    rec = run_against(httpx.MockTransport(lambda req: httpx.Response(404, text="no such model")))
    assert rec.error == "HTTP 404: no such model"

    eos_first = b'data: {"choices":[{"text":"","index":0,"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    rec = run_against(httpx.MockTransport(lambda req: httpx.Response(200, content=eos_first)), "completions")
    assert rec.error is not None and rec.error.startswith("no text generated (finish_reason=stop)")

    cut = b'data: {"choices":[{"text":"Hi","index":0,"finish_reason":null}]}\n\ndata: [DONE]\n\n'
    rec = run_against(httpx.MockTransport(lambda req: httpx.Response(200, content=cut)), "completions")
    assert rec.error is not None and "without a finish_reason" in rec.error


def test_sweep_table_and_levels() -> None:
    def result(c: int, tps: float) -> bench.BenchResult:
        recs = [bench.RequestRecord(t_start=0.0, chunk_times=[0.1, 0.2, 0.3], usage_tokens=3) for _ in range(c)]
        r = bench.summarize(recs, api="chat", concurrency=c, max_tokens=3, wall_time_s=3 * c / tps)
        r.server_rss_max_bytes = 300 * 2**20
        return r

    table = bench.format_sweep([result(1, 10.0), result(8, 25.0)], "q4_k_m")
    rows = [line for line in table.splitlines() if line.startswith("| 1 ") or line.startswith("| 8 ")]
    assert len(rows) == 2 and "2.50x" in rows[1] and "| 300 |" in rows[1]
    assert bench.parse_levels("1,2,4") == [1, 2, 4]
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers, got '1,x'"):
        bench.parse_levels("1,x")
    with pytest.raises(argparse.ArgumentTypeError, match="levels must be >= 1"):
        bench.parse_levels("0,2")
    assert bench.process_rss(os.getpid()) > 10 * 2**20
    assert bench.process_rss(2**22 + 12345) is None
