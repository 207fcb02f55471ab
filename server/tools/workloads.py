"""Bench workloads that exercise KV reuse: what a prefix cache and a KV pool change, and what they cannot.

Each workload sends chat requests built here (deterministic text from a seeded word list, so every server and
every run gets the same prompts) through `bench.send_one`, and reports the common statistics plus what the
workload is about:

  shared-prefix  `concurrency` chats at once with one ~800-token system prompt and different questions, in waves;
                 the first wave is cold, the later ones are counted (wall time per wave, TTFT, cached tokens)
  multi-turn     `concurrency` conversations, each turn resending the whole history plus ~130 new tokens; TTFT
                 per turn says whether a turn pays for its history or only for its new tokens
  long-prompt    one ~5,950-token prompt sent while `concurrency - 1` short streams keep streaming; its TTFT and
                 the short streams' longest gap between tokens (a stall) say whether anything starved
  distinct       every request a different ~300-token prompt from its first token on (no reuse possible)

Usage: ``shrinkserve bench --model NAME --workload shared-prefix --concurrency 8``.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from shrinkserve.server.tools.bench import (
    DEFAULT_PROMPT,
    BenchResult,
    RequestRecord,
    fmt_ms,
    fmt_num,
    mean,
    percentile,
    send_one,
    summarize,
)

Workload = Literal["shared-prefix", "multi-turn", "long-prompt", "distinct"]
WORKLOADS: tuple[str, ...] = ("shared-prefix", "multi-turn", "long-prompt", "distinct")

# Ordinary English words: the default model's tokenizer spends ~1.1 tokens per word on this text.
_WORD_TEXT = (
    "the a of to and in that it with as for on was by at from this be or are an which his her they one had "
    "not but what all were when we there can more if no man out other so time up about into only some could "
    "them see then now than like its two over first way new years after most where through back much before "
    "good little world very still long own while great under last right old city house river morning night "
    "water light stone garden window road letter market village winter summer forest mountain harbor ship "
    "bridge tower field engine lamp clock table book voice answer question reason number story country "
    "people family friend teacher doctor farmer captain child mother father brother sister keeper traveler "
    "walked carried opened closed watched listened remembered wrote painted built crossed followed found "
    "kept turned gathered waited returned noticed quiet bright narrow heavy careful sudden distant gentle "
    "early late warm cold green grey golden broken hidden small large across behind beneath beyond toward "
    "slowly quickly almost always never often together again every each another several many few"
)
WORDS = tuple(_WORD_TEXT.split())

TOPICS = ("the river", "the harbor", "the old tower", "the market", "the winter", "the letter", "the captain",
          "the garden", "the bridge", "the village", "the clock", "the forest", "the keeper", "the road",
          "the engine", "the family", "the teacher", "the storm", "the ship", "the mountain")


def prose(rng: random.Random, n_words: int) -> str:
    """Deterministic sentences of `n_words` words in total from WORDS."""
    sentences, left = [], n_words
    while left > 0:
        n = min(left, rng.randint(8, 16))
        words = [rng.choice(WORDS) for _ in range(n)]
        sentences.append(" ".join(words).capitalize() + ".")
        left -= n
    return " ".join(sentences)


def question(i: int) -> str:
    return f"Question {i}: in one sentence, what does the text say about {TOPICS[i % len(TOPICS)]}?"


@dataclass
class WorkloadOptions:
    model: str
    concurrency: int = 8
    max_tokens: int = 32
    ignore_eos: bool = False
    waves: int = 3  # shared-prefix
    system_words: int = 720  # shared-prefix: ~800 tokens
    turns: int = 6  # multi-turn
    turn_words: int = 115  # multi-turn: new words per user turn
    long_words: int = 5400  # long-prompt: ~5,950 tokens with the template
    short_max_tokens: int = 128  # long-prompt: the short streams beside it
    distinct_words: int = 270  # distinct: ~300 tokens
    requests_per_stream: int = 2  # distinct


@dataclass
class WorkloadResult:
    workload: str
    concurrency: int
    summary: BenchResult  # over the counted requests
    prompt_tokens_mean: float | None
    cached_tokens_mean: float | None  # None when the server never reported cached tokens
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, **self.summary.to_dict(), "prompt_tokens_mean": self.prompt_tokens_mean,
                "cached_tokens_mean": self.cached_tokens_mean, "details": self.details}


def chat_body(o: WorkloadOptions, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": o.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if o.ignore_eos:
        body["ignore_eos"] = True
    return body


def token_means(records: list[RequestRecord]) -> tuple[float | None, float | None]:
    ok = [r for r in records if r.ok]
    prompt = mean([r.prompt_tokens for r in ok if r.prompt_tokens is not None])
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    return prompt, mean(cached)


def result_of(workload: str, o: WorkloadOptions, records: list[RequestRecord], wall: float,
              details: dict[str, Any], max_tokens: int) -> WorkloadResult:
    summary = summarize(records, api="chat", concurrency=o.concurrency, max_tokens=max_tokens, wall_time_s=wall)
    prompt, cached = token_means(records)
    return WorkloadResult(workload, o.concurrency, summary, prompt, cached, details)


async def shared_prefix(client: httpx.AsyncClient, url: str, o: WorkloadOptions) -> WorkloadResult:
    system = prose(random.Random(1), o.system_words)
    walls: list[float] = []
    waves: list[list[RequestRecord]] = []
    for w in range(o.waves):
        bodies = [chat_body(o, [{"role": "system", "content": system},
                                {"role": "user", "content": question(w * o.concurrency + i)}], o.max_tokens)
                  for i in range(o.concurrency)]
        t0 = time.perf_counter()
        waves.append(list(await asyncio.gather(*(send_one(client, url, b, "chat") for b in bodies))))
        walls.append(time.perf_counter() - t0)
    warm = [r for wave in waves[1:] for r in wave] or waves[0]
    cold_ttfts = [t for r in waves[0] if r.ok and (t := r.ttft) is not None]
    details = {"wave_walls_s": walls, "warm_wave_wall_s": (sum(walls[1:]) / len(walls[1:])) if len(walls) > 1
               else walls[0], "cold_ttft_p50_s": percentile(cold_ttfts, 50)}
    return result_of("shared-prefix", o, warm, sum(walls[1:]) or walls[0], details, o.max_tokens)


async def multi_turn(client: httpx.AsyncClient, url: str, o: WorkloadOptions) -> WorkloadResult:
    async def conversation(c: int) -> list[RequestRecord]:
        rng = random.Random(100 + c)
        messages = [{"role": "system", "content": "You are a helpful assistant. " + prose(rng, 60)}]
        records = []
        for t in range(o.turns):
            messages.append({"role": "user", "content": prose(rng, o.turn_words) + " " + question(t)})
            rec = await send_one(client, url, chat_body(o, messages, o.max_tokens), "chat")
            records.append(rec)
            if not rec.ok:
                break
            messages.append({"role": "assistant", "content": rec.text})
        return records

    t0 = time.perf_counter()
    convs = await asyncio.gather(*(conversation(c) for c in range(o.concurrency)))
    wall = time.perf_counter() - t0
    per_turn = []
    for t in range(o.turns):
        turn = [conv[t] for conv in convs if len(conv) > t]
        prompt, cached = token_means(turn)
        ttfts = [x for r in turn if r.ok and (x := r.ttft) is not None]
        per_turn.append({"turn": t + 1, "ttft_p50_s": percentile(ttfts, 50), "prompt_tokens_mean": prompt,
                         "cached_tokens_mean": cached})
    records = [r for conv in convs for r in conv]
    return result_of("multi-turn", o, records, wall, {"turns": per_turn}, o.max_tokens)


async def long_prompt(client: httpx.AsyncClient, url: str, o: WorkloadOptions) -> WorkloadResult:
    text = prose(random.Random(7), o.long_words)
    long_body = chat_body(o, [{"role": "user", "content": text + "\n\nSummarize the text above in two sentences."}],
                          o.max_tokens)
    short_body = chat_body(o, [{"role": "user", "content": DEFAULT_PROMPT}], o.short_max_tokens)
    done = asyncio.Event()
    shorts: list[RequestRecord] = []

    async def short_stream() -> None:
        # Streams keep coming until the long request has finished, so it never runs alone.
        while True:
            shorts.append(await send_one(client, url, short_body, "chat"))
            if done.is_set():
                return

    async def the_long_one() -> RequestRecord:
        await asyncio.sleep(1.0)  # the short streams are decoding when it arrives
        try:
            return await send_one(client, url, long_body, "chat")
        finally:
            done.set()

    t0 = time.perf_counter()
    tasks = [short_stream() for _ in range(max(0, o.concurrency - 1))]
    long_rec, *_ = await asyncio.gather(the_long_one(), *tasks)
    wall = time.perf_counter() - t0
    gaps = [g for r in shorts if r.ok for g in r.itls]
    details = {"long_ok": long_rec.ok, "long_error": long_rec.error, "long_prompt_tokens": long_rec.prompt_tokens,
               "long_ttft_s": long_rec.ttft,
               "long_latency_s": None if long_rec.t_end is None else long_rec.t_end - long_rec.t_start,
               "short_requests": len(shorts), "short_itl_p95_s": percentile(gaps, 95),
               "short_itl_max_s": max(gaps) if gaps else None}
    return result_of("long-prompt", o, [long_rec, *shorts], wall, details, o.short_max_tokens)


async def distinct(client: httpx.AsyncClient, url: str, o: WorkloadOptions) -> WorkloadResult:
    # The request number comes first, so two prompts share no token after the chat template's own header.
    bodies = [chat_body(o, [{"role": "user", "content": f"{i}. {prose(random.Random(10_000 + i), o.distinct_words)}"
                                                        "\nWrite what happens next."}], o.max_tokens)
              for i in range(o.concurrency * o.requests_per_stream)]
    records: list[RequestRecord] = []

    async def worker() -> None:
        while bodies:
            records.append(await send_one(client, url, bodies.pop(0), "chat"))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(o.concurrency)))
    return result_of("distinct", o, records, time.perf_counter() - t0, {}, o.max_tokens)


RUNNERS = {"shared-prefix": shared_prefix, "multi-turn": multi_turn, "long-prompt": long_prompt,
           "distinct": distinct}


async def run_workload(base_url: str, workload: str, o: WorkloadOptions, *, timeout: float = 600,
                       warmup: int = 1) -> WorkloadResult:
    """Run one workload; `warmup` short uncounted requests go first (model load, first-call costs)."""
    if workload not in RUNNERS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    if o.concurrency < 1 or o.max_tokens < 1:
        raise ValueError("concurrency and max_tokens must be >= 1")
    url = base_url.rstrip("/") + "/chat/completions"
    limits = httpx.Limits(max_connections=o.concurrency + 2, max_keepalive_connections=o.concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        for _ in range(warmup):
            await send_one(client, url, chat_body(o, [{"role": "user", "content": "Hello!"}], 8), "chat")
        return await RUNNERS[workload](client, url, o)


def format_workload(r: WorkloadResult, label: str) -> str:
    s = r.summary
    cached = "not reported" if r.cached_tokens_mean is None else fmt_num(r.cached_tokens_mean)
    lines = [f"{label}: workload={r.workload} concurrency={r.concurrency}",
             f"  requests ok / failed     {s.requests_ok} / {s.requests_failed}",
             f"  TTFT p50 / p95 (ms)      {fmt_ms(s.ttft_p50_s)} / {fmt_ms(s.ttft_p95_s)}",
             f"  ITL p50 (ms)             {fmt_ms(s.itl_p50_s)}",
             f"  aggregate tok/s          {fmt_num(s.aggregate_tps)}",
             f"  prompt / cached tokens   {fmt_num(r.prompt_tokens_mean)} / {cached} (mean per request)",
             f"  wall time (s)            {fmt_num(s.wall_time_s, 2)}"]
    if r.workload == "shared-prefix":
        walls = ", ".join(f"{w:.2f}" for w in r.details["wave_walls_s"])
        lines.append(f"  wave walls (s)           {walls} (first cold; counted: the rest)")
    elif r.workload == "multi-turn":
        for t in r.details["turns"]:
            lines.append(f"  turn {t['turn']}: TTFT p50 {fmt_ms(t['ttft_p50_s'])} ms, prompt "
                         f"{fmt_num(t['prompt_tokens_mean'], 0)}, cached {fmt_num(t['cached_tokens_mean'], 0)}")
    elif r.workload == "long-prompt":
        d = r.details
        lines.append(f"  long request             {'ok' if d['long_ok'] else d['long_error']}: "
                     f"{d['long_prompt_tokens']} prompt tokens, TTFT {fmt_ms(d['long_ttft_s'])} ms")
        lines.append(f"  short streams            {d['short_requests']} requests, ITL p95 "
                     f"{fmt_ms(d['short_itl_p95_s'])} ms, longest gap {fmt_ms(d['short_itl_max_s'])} ms")
    lines += [f"  error: {e}" for e in s.errors]
    return "\n".join(lines)
