"""Serving logic for the OpenAI endpoints: validate, admit, generate in a worker thread, respond."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from shrinkserve.server import protocol as P
from shrinkserve.server.chat import render_chat
from shrinkserve.server.engines.base import Engine, Sequence
from shrinkserve.server.errors import APIError, bad_request
from shrinkserve.server.generation import Step, TokenInfo, generate
from shrinkserve.server.metrics import Metrics
from shrinkserve.server.registry import ProfileRuntime, Registry
from shrinkserve.server.sampling import SamplingParams
from shrinkserve.server.traffic_log import TrafficLog

_DONE = object()


@dataclass
class Outcome:
    """One finished (or aborted) generation for one prompt."""

    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    prompt_logprobs: list[TokenInfo] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0


class _Lease:
    """A slot held by one request. It goes back to the pool only once no worker thread uses it, so a
    cancelled generation that is still finishing its step never shares a KV cache with the next request."""

    def __init__(self, seq: Sequence, give_back: Callable[[Sequence], None]) -> None:
        self.seq = seq
        self._give_back = give_back
        self._lock = threading.Lock()
        self._running = False
        self._released = False

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._give_back(self.seq)

    def worker_started(self) -> None:
        with self._lock:
            self._running = True

    def worker_stopped(self, *, cancelled: bool) -> None:
        with self._lock:
            self._running = False
            if cancelled:
                self._release()

    def release_if_idle(self) -> None:
        with self._lock:
            if not self._running:
                self._release()


class Server:
    def __init__(self, registry: Registry, metrics: Metrics, traffic: TrafficLog) -> None:
        self.registry = registry
        self.metrics = metrics
        self.traffic = traffic

    # ------------------------------------------------------------ profile resolution

    async def profile(self, forced: str | None, model: str | None) -> ProfileRuntime:
        """The route's profile if the URL names one, else the request's `model`."""
        rt = self.registry.get(forced or model or "")
        await self.registry.ensure_ready(rt)
        return rt

    # ------------------------------------------------------------ running a generation

    async def _stream_steps(
        self, rt: ProfileRuntime, lease: _Lease, prompt_ids: list[int], params: SamplingParams,
        prompt_logprobs: int | None, t_arrival: float,
    ) -> AsyncIterator[Step]:
        """Run `generate` in a thread; yield its Steps here. Cancelling the consumer stops decoding."""
        assert rt.engine is not None
        engine: Engine = rt.engine
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        capture = self.traffic.wants(rt.name)
        top_k = self.traffic.settings.top_k if capture else 0

        def worker() -> None:
            try:
                produced: list[TokenInfo] = []
                for step in generate(engine, lease.seq, prompt_ids, params, cancel, prompt_logprobs=prompt_logprobs,
                                     teacher_top_k=top_k):
                    loop.call_soon_threadsafe(queue.put_nowait, step)
                    produced += step.tokens
                    if capture and step.finish_reason in ("stop", "length"):
                        self.traffic.record(
                            profile=rt.name, prompt_ids=list(prompt_ids), prompt_text=engine.detokenize(prompt_ids),
                            completion_ids=[t.id for t in produced],
                            completion_text=b"".join(t.bytes for t in produced).decode("utf-8", errors="replace"),
                            finish_reason=step.finish_reason, teacher=[t.teacher or [] for t in produced])
            except BaseException as exc:  # surfaced to the consumer, never kills the server
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                lease.worker_stopped(cancelled=cancel.is_set())
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        lease.worker_started()
        threading.Thread(target=worker, name=f"gen-{rt.name}", daemon=True).start()
        m, name = self.metrics, rt.name
        m.prompt_tokens.labels(name).inc(len(prompt_ids))
        last_token_at: float | None = None
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, Step)
                produced = len(item.tokens) + item.uncounted
                if produced:
                    now = time.perf_counter()
                    if last_token_at is None:
                        m.ttft.labels(name).observe(now - t_arrival)
                    else:
                        m.itl.labels(name).observe(now - last_token_at)
                    last_token_at = now
                    m.generation_tokens.labels(name).inc(produced)
                if item.finish_reason is not None:
                    finished = True
                    m.request_success.labels(name, item.finish_reason).inc()
                    m.e2e.labels(name).observe(time.perf_counter() - t_arrival)
                yield item
        finally:
            cancel.set()
            if not finished:  # the client went away (or the worker failed) before the end
                m.request_success.labels(name, "abort").inc()
                m.e2e.labels(name).observe(time.perf_counter() - t_arrival)

    async def _run_all(
        self, rt: ProfileRuntime, prompts: list[list[int]], params: SamplingParams, prompt_logprobs: int | None,
        t_arrival: float,
    ) -> AsyncIterator[tuple[int, Step]]:
        """Generate for each prompt in turn on one slot; yields (prompt index, step)."""
        lease = _Lease(await self.registry.acquire(rt), lambda seq: self.registry.release(rt, seq))
        try:
            for i, ids in enumerate(prompts):
                async for step in self._stream_steps(rt, lease, ids, params, prompt_logprobs, t_arrival):
                    yield i, step
        finally:
            lease.release_if_idle()

    # ------------------------------------------------------------ request preparation

    def _prompt_ids(self, engine: Engine, prompts: list[str | list[int]]) -> list[list[int]]:
        out = []
        for p in prompts:
            if isinstance(p, str):
                ids = engine.tokenize(p, add_special=True)
            else:
                bad = [t for t in p if not 0 <= t < engine.vocab_size]
                if bad:
                    raise bad_request(f"token id {bad[0]} is out of range [0, {engine.vocab_size})", param="prompt")
                ids = list(p)
            if not ids:
                raise bad_request("the prompt is empty after tokenization", param="prompt")
            out.append(ids)
        return out

    @staticmethod
    def _max_tokens(requested: int | None, default: int | None, prompt_len: int, ctx: int) -> int:
        if requested is None:
            room = ctx - prompt_len
            if room <= 0:
                raise bad_request(f"This model's maximum context length is {ctx} tokens. However, your prompt has "
                                  f"{prompt_len} tokens.", param="messages", code="context_length_exceeded")
            return room if default is None else min(default, room)
        if prompt_len + requested > ctx:
            raise bad_request(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the completion). "
                "Please reduce the prompt or max_tokens.", param="max_tokens", code="context_length_exceeded")
        return requested

    @staticmethod
    def _check_common(req: P._SamplingRequest) -> None:
        if req.n != 1:
            raise bad_request("n > 1 is not supported; send separate requests", param="n")

    # ------------------------------------------------------------ /v1/completions

    async def completions(self, req: P.CompletionRequest, http: Request, forced: str | None) -> object:
        t_arrival = time.perf_counter()
        self._check_common(req)
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        rt = await self.profile(forced, req.model)
        engine = rt.engine
        assert engine is not None
        prompts = self._prompt_ids(engine, req.prompts())
        longest = max(len(p) for p in prompts)
        max_tokens = self._max_tokens(req.max_tokens, 16, longest, engine.context_length)
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                stop=tuple(req.stop or ()), logprobs=req.logprobs, ignore_eos=req.ignore_eos)
        prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        prompt_texts = [p if isinstance(p, str) else engine.detokenize(ids)
                        for p, ids in zip(req.prompts(), prompts, strict=True)]
        self.registry.check_capacity(rt)
        steps = self._run_all(rt, prompts, params, prompt_lp, t_arrival)
        if req.stream:
            return self._sse(self._completion_chunks(req, rt, prompts, prompt_texts, steps))
        outcomes = await self._collect(steps, len(prompts), http)
        choices = []
        for i, out in enumerate(outcomes):
            text = (prompt_texts[i] if req.echo else "") + out.text
            logprobs = None
            if req.logprobs is not None:
                toks = (out.prompt_logprobs or []) + out.tokens if req.echo else out.tokens
                logprobs = completion_logprobs(toks)
            choices.append(P.CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=out.finish_reason))
        usage = _usage(sum(len(p) for p in prompts), sum(o.completion_tokens for o in outcomes))
        return P.CompletionResponse(model=rt.name, choices=choices, usage=usage)

    async def _completion_chunks(
        self, req: P.CompletionRequest, rt: ProfileRuntime, prompts: list[list[int]],
        prompt_texts: list[str], steps: AsyncIterator[tuple[int, Step]],
    ) -> AsyncIterator[str]:
        rid, created = P.new_id("cmpl"), int(time.time())
        completion_tokens = 0
        echoed = [False] * len(prompts)
        async for i, step in steps:
            completion_tokens += len(step.tokens) + step.uncounted
            text = step.text
            toks = list(step.tokens)
            if req.echo and not echoed[i]:
                text = prompt_texts[i] + text
                toks = (step.prompt_logprobs or []) + toks
                echoed[i] = True
            if not text and not toks and step.finish_reason is None:
                continue
            lp = completion_logprobs(toks) if req.logprobs is not None else None
            choice = P.CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=step.finish_reason)
            yield _sse_data(P.CompletionChunk(id=rid, created=created, model=rt.name, choices=[choice]))
        if req.include_usage:
            usage = _usage(sum(len(p) for p in prompts), completion_tokens)
            yield _sse_data(P.CompletionChunk(id=rid, created=created, model=rt.name, choices=[], usage=usage))

    # ------------------------------------------------------------ /v1/chat/completions

    async def chat(self, req: P.ChatCompletionRequest, http: Request, forced: str | None) -> object:
        t_arrival = time.perf_counter()
        self._check_common(req)
        rt = await self.profile(forced, req.model)
        engine = rt.engine
        assert engine is not None
        # The template already placed any BOS text, so no special tokens are added on top.
        ids = engine.tokenize(render_chat(engine, req.messages), add_special=False)
        max_tokens = self._max_tokens(req.max_tokens, None, len(ids), engine.context_length)
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                stop=tuple(req.stop or ()), logprobs=k, ignore_eos=req.ignore_eos)
        self.registry.check_capacity(rt)
        steps = self._run_all(rt, [ids], params, None, t_arrival)
        if req.stream:
            return self._sse(self._chat_chunks(req, rt, len(ids), steps))
        (out,) = await self._collect(steps, 1, http)
        choice = P.ChatChoice(index=0, message=P.AssistantMessage(content=out.text),
                              logprobs=chat_logprobs(out.tokens) if req.logprobs else None,
                              finish_reason=out.finish_reason)
        return P.ChatCompletionResponse(model=rt.name, choices=[choice],
                                        usage=_usage(len(ids), out.completion_tokens))

    async def _chat_chunks(
        self, req: P.ChatCompletionRequest, rt: ProfileRuntime, prompt_len: int,
        steps: AsyncIterator[tuple[int, Step]],
    ) -> AsyncIterator[str]:
        rid, created = P.new_id("chatcmpl"), int(time.time())

        def chunk(delta: P.DeltaMessage, finish: str | None = None, lp: P.ChatLogprobs | None = None) -> str:
            choice = P.ChatChunkChoice(index=0, delta=delta, logprobs=lp, finish_reason=finish)
            return _sse_data(P.ChatCompletionChunk(id=rid, created=created, model=rt.name, choices=[choice]))

        yield chunk(P.DeltaMessage(role="assistant", content=""))
        completion_tokens = 0
        async for _, step in steps:
            completion_tokens += len(step.tokens) + step.uncounted
            if not step.text and not step.tokens and step.finish_reason is None:
                continue
            lp = chat_logprobs(step.tokens) if req.logprobs and step.tokens else None
            yield chunk(P.DeltaMessage(content=step.text or None) if step.text else P.DeltaMessage(),
                        step.finish_reason, lp)
        if req.include_usage:
            usage = _usage(prompt_len, completion_tokens)
            yield _sse_data(P.ChatCompletionChunk(id=rid, created=created, model=rt.name, choices=[], usage=usage))

    # ------------------------------------------------------------ plumbing

    async def _collect(self, steps: AsyncIterator[tuple[int, Step]], n: int, http: Request) -> list[Outcome]:
        """Drain the steps; if the client disconnects meanwhile, stop generating."""
        outcomes = [Outcome() for _ in range(n)]

        async def drain() -> None:
            async for i, step in steps:
                o = outcomes[i]
                o.text += step.text
                o.tokens.extend(step.tokens)
                o.completion_tokens += len(step.tokens) + step.uncounted
                if step.prompt_logprobs is not None:
                    o.prompt_logprobs = step.prompt_logprobs
                if step.finish_reason is not None:
                    o.finish_reason = step.finish_reason

        task = asyncio.ensure_future(drain())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await http.is_disconnected():
                    task.cancel()
            task.result()
            return outcomes
        finally:
            if not task.done():
                task.cancel()

    def _sse(self, chunks: AsyncIterator[str]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for data in chunks:
                    yield data
            except APIError as exc:
                yield f"data: {json.dumps(exc.body())}\n\n"
            except Exception as exc:  # headers are sent: report in-band, as vLLM does
                yield f"data: {json.dumps(APIError(500, f'generation failed: {exc}').body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------- response helpers


def _sse_data(model: P.BaseModel) -> str:
    return f"data: {model.model_dump_json(exclude_none=False)}\n\n"


def _usage(prompt: int, completion: int) -> P.Usage:
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_logprobs(tokens: list[TokenInfo]) -> P.CompletionLogprobs:
    """OpenAI's legacy logprobs: the chosen token is always among `top_logprobs`, as in vLLM."""
    out = P.CompletionLogprobs()
    offset = 0
    for t in tokens:
        out.tokens.append(t.text)
        out.token_logprobs.append(t.logprob)
        if t.logprob is None:
            out.top_logprobs.append(None)
        else:
            top = {alt.text: alt.logprob for alt in t.top or [] if alt.logprob is not None}
            top.setdefault(t.text, t.logprob)
            out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(t.text)
    return out


def chat_logprobs(tokens: list[TokenInfo]) -> P.ChatLogprobs:
    content = [
        P.ChatTokenLogprob(
            token=t.text, logprob=t.logprob or 0.0, bytes=list(t.bytes),
            top_logprobs=[P.TopLogprob(token=a.text, logprob=a.logprob or 0.0, bytes=list(a.bytes))
                          for a in t.top or []],
        )
        for t in tokens
    ]
    return P.ChatLogprobs(content=content)
