"""The one flow chat and completions share: prepare → admit → generate → collect or stream, with usage.

`prepare_*` (in completions.py / chat.py) turn a protocol request into `GenerationRequest`s, one per
choice (`n` per prompt), each with its own output constraint; they run in a worker thread (templates,
tokenization, grammar compilation). `start()` admits the request with the profile's core before any
response exists (so busy is a 429 and draining a 503), with room for the `n` choices of a prompt to run
at once; `Run` generates them (the prompts of a multi-prompt completion one after another), records the
request metrics, and counts usage once for both streamed and non-streamed responses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import TypeVar

from shrinkserve.server.engines.base import Tokenizer
from shrinkserve.server.protocol import openai as P
from shrinkserve.server.protocol.errors import APIError, bad_request
from shrinkserve.server.runtime.core import Ticket
from shrinkserve.server.runtime.grammar import GrammarError
from shrinkserve.server.runtime.logits_processors import LogitsParamsError, logits_params_from_request
from shrinkserve.server.runtime.metrics import Metrics
from shrinkserve.server.runtime.registry import ProfileRuntime
from shrinkserve.server.runtime.types import (
    Busy,
    Draining,
    GenerationRequest,
    NeverFits,
    SamplingParams,
    Step,
    TokenConstraint,
    TokenInfo,
    Unavailable,
    Unsupported,
)
from shrinkserve.server.serving.tools.validate import ToolsError

T = TypeVar("T")


@dataclass
class Prepared:
    """A validated request: one GenerationRequest per choice, ready to admit. Choice `i` answers prompt
    `i // n` (OpenAI's and vLLM's order of choices for several prompts with `n` > 1)."""

    rt: ProfileRuntime
    requests: list[GenerationRequest]
    prompt_texts: list[str]
    t_arrival: float
    n: int = 1

    def prompt_of(self, choice: int) -> int:
        return choice // self.n

    @property
    def prompt_tokens(self) -> int:
        """Usage counts each prompt once, however many choices answer it."""
        return sum(len(r.prompt_ids) for r in self.requests[:: self.n])


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


def sampling_params(req: P._SamplingRequest, max_new: int, logprobs: int | None, vocab_size: int) -> SamplingParams:
    """The request's sampler fields, checked (ranges, logit_bias ids against the vocabulary); null = default."""
    fields = {name: getattr(req, name) for name in ("presence_penalty", "frequency_penalty", "repetition_penalty",
                                                    "top_k", "min_p", "logit_bias")}
    try:
        lp = logits_params_from_request(fields, vocab_size)
    except LogitsParamsError as exc:
        raise bad_request(str(exc), param=exc.param) from None
    return SamplingParams(
        max_tokens=max_new, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=tuple(req.stop or ()),
        logprobs=logprobs, ignore_eos=bool(req.ignore_eos), logit_bias=lp.logit_bias,
        repetition_penalty=lp.repetition_penalty, frequency_penalty=lp.frequency_penalty,
        presence_penalty=lp.presence_penalty, top_k=lp.top_k, min_p=lp.min_p,
    )


def choices(prompts: Sequence[list[int]], params: SamplingParams, n: int, *,
            constraint: Callable[[], TokenConstraint] | None = None,
            prompt_logprobs: int | None = None) -> list[GenerationRequest]:
    """`n` generation requests per prompt. With a seed, choice j > 0 uses seed + j (as vLLM's parallel
    sampling does), so choice 0 is what `n: 1` gives and the same request always gives the same choices.
    Each choice gets its own constraint: a grammar's state is per sequence."""
    out = []
    for ids in prompts:
        for j in range(n):
            p = params if j == 0 or params.seed is None else replace(params, seed=(params.seed + j) % 2**64)
            out.append(GenerationRequest(ids, p, prompt_logprobs=prompt_logprobs,
                                         constraint=constraint() if constraint is not None else None))
    return out


def client_errors(fn: Callable[[], T]) -> T:
    """Run a `prepare`: a bad schema, grammar or tool definition is the client's 400, naming the field."""
    try:
        return fn()
    except (GrammarError, ToolsError) as exc:
        raise bad_request(str(exc), param=exc.param) from None


def usage(prompt: int, completion: int, cached: int = 0) -> P.Usage:
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached))


# ---------------------------------------------------------------- admission and generation


async def start(prepared: Prepared, metrics: Metrics, capture_top_k: int = 0, route: str | None = None) -> Run:
    """Admit the request with the profile's core; raises APIError 429 / 503 / 400 before any response.
    `capture_top_k` > 0: the generation is captured (with the route it came on)."""
    core = prepared.rt.core
    if core is None:
        raise APIError(503, f"profile {prepared.rt.name!r} is not loaded", code="profile_not_ready",
                       headers={"Retry-After": "5"})
    need = max(r.max_total_tokens for r in prepared.requests)
    # A core that cannot serve some requests (vLLM: no Python logits processors) says so before admission.
    check = getattr(core, "check_request", None)
    try:
        if check is not None:
            for r in prepared.requests:
                check(r)
        ticket = await core.admit(prepared.n, max_total_tokens=need)
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
    for r in prepared.requests:
        r.capture_top_k, r.route = capture_top_k, route
    return Run(prepared, ticket, metrics)


class Run:
    """An admitted request. Its choices generate on the ticket — the `n` choices of a prompt at once (as
    many as the ticket's shares allow), several prompts one after another.

    Its owner closes it on every path (`async with run:`; a streamed response closes it when the response
    ends): that aborts what still generates and hands the ticket back, also when `steps()` never started
    (a client gone before the first byte). A consumed or closed `steps()` closes it as well."""

    def __init__(self, prepared: Prepared, ticket: Ticket, metrics: Metrics) -> None:
        self.prepared = prepared
        self.ticket = ticket
        self.metrics = metrics
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens served from the prefix cache (each prompt's first choice)
        self._iterators: list[AsyncGenerator[tuple[int, Step], None]] = []  # every steps() handed out

    @property
    def name(self) -> str:
        return self.prepared.rt.name

    def steps(self) -> AsyncGenerator[tuple[int, Step], None]:
        """(choice index, step) for every choice; choices of one prompt interleave. `aclose()` closes it."""
        steps = self._steps()
        self._iterators.append(steps)
        return steps

    async def _steps(self) -> AsyncGenerator[tuple[int, Step], None]:
        try:
            if self.prepared.n == 1:
                for i, req in enumerate(self.prepared.requests):
                    # Closed here, not by the garbage collector: closing it aborts the generation.
                    async with aclosing(self._observed(req)) as steps:
                        async for step in steps:
                            self.completion_tokens += step.n_tokens
                            self.cached_tokens += step.cached_tokens
                            yield i, step
            else:
                async for i, step in self._merged():
                    self.completion_tokens += step.n_tokens
                    if i % self.prepared.n == 0:  # usage counts each prompt once
                        self.cached_tokens += step.cached_tokens
                    yield i, step
        finally:
            self.close()

    async def _merged(self) -> AsyncIterator[tuple[int, Step]]:
        """Every choice in its own task (the ticket's shares bound how many run), steps merged as they come."""
        queue: asyncio.Queue[tuple[int, Step | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, req: GenerationRequest) -> None:
            try:
                async with aclosing(self._observed(req)) as steps:
                    async for step in steps:
                        queue.put_nowait((i, step))
            except Exception as exc:
                queue.put_nowait((i, exc))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(self.prepared.requests)]
        try:
            running = len(tasks)
            while running:
                i, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            # No await here: a cancelled stream must not wait; each task's cancellation aborts its sequence.
            for t in tasks:
                t.cancel()

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
        except Unavailable as exc:  # the engine went away under the request (vLLM child died): 503, not 500
            raise APIError(503, str(exc), code="profile_unavailable",
                           headers={"Retry-After": str(max(1, round(exc.retry_after)))}) from exc
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
        """Hand back the ticket's room no generation holds (idempotent; running ones return theirs as they end)."""
        self.ticket.release()

    async def aclose(self) -> None:
        """Close every `steps()` handed out (aborting the generations still running), then `close()`."""
        iterators, self._iterators = self._iterators, []  # closed ones hold nothing; drop the references
        try:
            for steps in iterators:
                # One still inside a step belongs to a task that was cancelled, and unwinds with it.
                if not steps.ag_running:
                    await steps.aclose()
        finally:
            self.close()

    async def __aenter__(self) -> Run:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
