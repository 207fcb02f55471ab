"""The one flow chat and completions share: prepare → admit → generate → collect or stream, with usage.

`prepare_*` (in completions.py / chat.py) turn a protocol request into `GenerationRequest`s; `start()`
admits them with the profile's core before any response exists (so busy is a 429 and draining a 503);
`Run` generates each prompt in turn, records the request metrics, and counts usage once for both
streamed and non-streamed responses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, suppress
from dataclasses import dataclass, field

from shrinkserve.server.api import protocol as P
from shrinkserve.server.api.errors import APIError, bad_request
from shrinkserve.server.engines.base import Tokenizer
from shrinkserve.server.runtime.core import Ticket
from shrinkserve.server.runtime.metrics import Metrics
from shrinkserve.server.runtime.registry import ProfileRuntime
from shrinkserve.server.runtime.types import (
    Busy,
    Draining,
    GenerationRequest,
    NeverFits,
    SamplingParams,
    Step,
    TokenInfo,
    Unavailable,
    Unsupported,
)


@dataclass
class Prepared:
    """A validated request: one GenerationRequest per prompt, ready to admit."""

    rt: ProfileRuntime
    requests: list[GenerationRequest]
    prompt_texts: list[str]
    t_arrival: float

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)


@dataclass
class Outcome:
    """One prompt's generation, collected."""

    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    prompt_logprobs: list[TokenInfo] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0


# ---------------------------------------------------------------- preparation


def tokenizer_of(rt: ProfileRuntime) -> Tokenizer:
    assert rt.engine is not None, "a ready profile has an engine"
    return rt.engine


def context_of(rt: ProfileRuntime) -> int:
    """The most tokens one generation may hold on this profile (a KV slot's size)."""
    return rt.core.context_length if rt.core is not None else tokenizer_of(rt).context_length


def prompt_ids(tok: Tokenizer, prompts: Sequence[str | list[int]]) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            ids = tok.tokenize(p, add_special=True)
        else:
            bad = [t for t in p if not 0 <= t < tok.vocab_size]
            if bad:
                raise bad_request(f"token id {bad[0]} is out of range [0, {tok.vocab_size})", param="prompt")
            ids = list(p)
        if not ids:
            raise bad_request("the prompt is empty after tokenization", param="prompt")
        out.append(ids)
    return out


def max_tokens(requested: int | None, default: int | None, prompt_len: int, ctx: int, param: str) -> int:
    if requested is None:
        room = ctx - prompt_len
        if room <= 0:
            raise bad_request(f"This model's maximum context length is {ctx} tokens. However, your prompt has "
                              f"{prompt_len} tokens.", param=param, code="context_length_exceeded")
        return room if default is None else min(default, room)
    if prompt_len + requested > ctx:
        raise bad_request(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the completion). "
            "Please reduce the prompt or max_tokens.", param="max_tokens", code="context_length_exceeded")
    return requested


def sampling_params(req: P._SamplingRequest, max_new: int, logprobs: int | None) -> SamplingParams:
    if req.n != 1:
        raise bad_request("n > 1 is not supported; send separate requests", param="n")
    return SamplingParams(max_tokens=max_new, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                          stop=tuple(req.stop or ()), logprobs=logprobs, ignore_eos=req.ignore_eos)


def usage(prompt: int, completion: int) -> P.Usage:
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# ---------------------------------------------------------------- admission and generation


async def start(prepared: Prepared, metrics: Metrics, capture_top_k: int = 0) -> Run:
    """Admit the request with the profile's core; raises APIError 429 / 503 / 400 before any response."""
    core = prepared.rt.core
    if core is None:
        raise APIError(503, f"profile {prepared.rt.name!r} is not loaded", code="profile_not_ready",
                       headers={"Retry-After": "5"})
    need = max(r.max_total_tokens for r in prepared.requests)
    for r in prepared.requests:
        r.capture_top_k = capture_top_k
    # A core that cannot serve some requests (vLLM: no Python logits processors) says so before admission.
    check = getattr(core, "check_request", None)
    try:
        if check is not None:
            for r in prepared.requests:
                check(r)
        ticket = await core.admit(1, max_total_tokens=need)
    except Busy as exc:
        raise APIError(429, str(exc), code="server_busy",
                       headers={"Retry-After": str(max(1, round(exc.retry_after)))}) from exc
    except Draining as exc:
        raise APIError(503, str(exc), code="server_shutting_down",
                       headers={"Retry-After": str(max(1, round(exc.retry_after)))}) from exc
    except NeverFits as exc:
        raise bad_request(str(exc), param="max_tokens", code="context_length_exceeded") from exc
    except Unavailable as exc:
        raise APIError(503, str(exc), code="profile_unavailable",
                       headers={"Retry-After": str(max(1, round(exc.retry_after)))}) from exc
    except Unsupported as exc:
        raise bad_request(str(exc), param=exc.param) from exc
    return Run(prepared, ticket, metrics)


class Run:
    """An admitted request. Its prompts generate one after another on the ticket; `steps()` (or
    `collect()`) must be consumed, or `close()` called, to hand the ticket back."""

    def __init__(self, prepared: Prepared, ticket: Ticket, metrics: Metrics) -> None:
        self.prepared = prepared
        self.ticket = ticket
        self.metrics = metrics
        self.completion_tokens = 0
        self._loop = asyncio.get_running_loop()

    @property
    def name(self) -> str:
        return self.prepared.rt.name

    async def steps(self) -> AsyncIterator[tuple[int, Step]]:
        """(prompt index, step) for every prompt in turn."""
        try:
            for i, req in enumerate(self.prepared.requests):
                async for step in self._observed(req):
                    self.completion_tokens += step.n_tokens
                    yield i, step
        finally:
            self.close()

    async def _observed(self, req: GenerationRequest) -> AsyncIterator[Step]:
        """The core's steps of one prompt, with TTFT / ITL / token / finish metrics recorded."""
        core = self.prepared.rt.core
        assert core is not None
        m, name, t_arrival = self.metrics, self.name, self.prepared.t_arrival
        # the label lookups once per generation, not per token
        ttft, itl, e2e, produced = (m.ttft.labels(name), m.itl.labels(name), m.e2e.labels(name),
                                    m.generation_tokens.labels(name))
        m.prompt_tokens.labels(name).inc(len(req.prompt_ids))
        last_token_at: float | None = None
        finished = False
        try:
            async with aclosing(core.generate(self.ticket, req)) as steps:
                async for step in steps:
                    if step.n_tokens:
                        now = time.perf_counter()
                        if last_token_at is None:
                            ttft.observe(now - t_arrival)
                        else:
                            itl.observe(now - last_token_at)
                        last_token_at = now
                        produced.inc(step.n_tokens)
                    if step.finish_reason is not None:
                        finished = True
                        m.request_success.labels(name, step.finish_reason).inc()
                        e2e.observe(time.perf_counter() - t_arrival)
                    yield step
        finally:
            if not finished:  # the client went away (or generation failed) before the end
                m.request_success.labels(name, "abort").inc()
                e2e.observe(time.perf_counter() - t_arrival)

    async def collect(self) -> list[Outcome]:
        outcomes = [Outcome() for _ in self.prepared.requests]
        async with aclosing(self.steps()) as steps:
            async for i, step in steps:
                o = outcomes[i]
                o.text += step.text
                o.tokens.extend(step.tokens)
                o.completion_tokens += step.n_tokens
                if step.prompt_logprobs is not None:
                    o.prompt_logprobs = step.prompt_logprobs
                if step.finish_reason is not None:
                    o.finish_reason = step.finish_reason
        return outcomes

    def close(self) -> None:
        self.ticket.release()

    def __del__(self) -> None:
        # A streaming response whose body never started (the client left at once) still returns its room.
        if not self.ticket.returned:
            with suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.ticket.release)
