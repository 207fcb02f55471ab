"""`VllmCore`: the EngineCore of an `engine: vllm` profile — one managed `vllm serve` child behind our API.

The HTTP layer cannot tell it from an in-process core: the same `admit()` (our `Admission`: 429 beyond the
queue, 503 while draining, 400 for what never fits), the same `Step`s, the same observers (capture) and
metrics. What differs is below `generate()`:

* the prompt is tokenized on our side (`HfTokenizer` of the artifact) and streamed to vLLM as token ids
  (`/v1/completions`, `return_token_ids`, logprobs keyed by token id); vLLM samples;
* each streamed token is turned into a `Step` by `_Stream`, with the same rules as `DecodeState`: text from
  our tokenizer's bytes through the same `StopText` (stop strings held back, UTF-8 safe, never returned), the
  EOS not listed but counted, logprobs as `TokenInfo`s with their top-k, and the sampled tokens, their
  logprobs and top-`capture_top_k` kept for a `FinishedGeneration` (capture);
* leaving `generate()` early (client gone, drain deadline) closes the HTTP stream, which aborts the request
  in vLLM;
* a monitor thread health-checks the child and restarts it (`VllmOptions.max_restarts` times in a row);
  meanwhile `admit()` answers 503 `profile_unavailable`.

What vLLM cannot take is refused before admission (`check_request` → 400): Python logits processors and
token constraints (grammars) run inside our decode loop, which vLLM does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from shrinkserve.server.engines.base import Tokenizer
from shrinkserve.server.engines.vllm_client import CompletionChunk, TopLogprob, VllmClient, VllmRequestError
from shrinkserve.server.engines.vllm_process import VllmProcess, VllmStartError
from shrinkserve.server.runtime.core import Admission, Ticket
from shrinkserve.server.runtime.output import OutputProcessor, token_info
from shrinkserve.server.runtime.types import (
    CoreStats,
    FinishedGeneration,
    GenerationRequest,
    SamplingParams,
    Step,
    Unavailable,
    Unsupported,
)

log = logging.getLogger("shrinkserve.vllm")

Observer = Callable[[FinishedGeneration], None]

_END = object()
_ABORT = object()


def _top(top: list[TopLogprob] | None, k: int) -> list[tuple[int, float]]:
    return [(t.token_id, t.logprob) for t in (top or [])[:k]]


class _Stream(OutputProcessor):
    """vLLM's streamed tokens → our Steps, for one generation (the out-of-process twin of DecodeState)."""

    @property
    def asked_logprobs(self) -> int | None:
        """The k sent to vLLM: what the client asked for, widened to the capture's top-k."""
        k = self.params.logprobs
        if self.record:
            k = max(k or 0, self.req.capture_top_k)
        if self.req.prompt_logprobs is not None:
            k = max(k or 0, self.req.prompt_logprobs)
        return k

    def prompt_step(self, chunk: CompletionChunk) -> Step | None:
        """The step carrying the prompt's logprobs (echo), from the first chunk; None when not asked for."""
        k = self.req.prompt_logprobs
        if k is None:
            return None
        ids = self.req.prompt_ids
        values = chunk.prompt_logprobs or [None] * len(ids)
        tops = chunk.prompt_top_logprobs or [[] for _ in ids]
        infos = [token_info(self.tok, ids[0])]
        for pos in range(1, len(ids)):
            lp = values[pos] if pos < len(values) else None
            infos.append(token_info(self.tok, ids[pos], lp if lp is not None else -math.inf, _top(tops[pos], k)))
        return Step("", prompt_logprobs=infos)

    def tokens(self, chunk: CompletionChunk) -> list[Step]:
        """Steps of the tokens one chunk adds (usually one); the last is final once the generation ends."""
        steps: list[Step] = []
        for i, token in enumerate(chunk.token_ids):
            if self.finish_reason is not None:
                break
            lp = chunk.logprobs[i] if i < len(chunk.logprobs) else None
            top = chunk.top_logprobs[i] if i < len(chunk.top_logprobs) else []
            steps.append(self.emit(token, lp, _top(top, self.top_wanted)))
        if self.finish_reason is None and chunk.finish_reason is not None:
            # vLLM ended it (its stop string, EOS it saw, its length): release what we held back, cut at a stop
            # string vLLM matched in its own detokenized text.
            tail = self.text.flush()
            if isinstance(chunk.stop_reason, str) and chunk.stop_reason in tail:
                tail = tail[: tail.index(chunk.stop_reason)]
            steps.append(self.end(chunk.finish_reason if chunk.finish_reason in ("stop", "length") else "abort", tail))
        return steps


def sampler_extras(p: SamplingParams) -> dict[str, Any]:
    """The sampler parameters beyond temperature/top-p, in vLLM's request fields (our processors follow vLLM's
    semantics and order, server/runtime/logits_processors.py). Only those set are sent; none is dropped."""
    extra: dict[str, Any] = {}
    if p.logit_bias:
        extra["logit_bias"] = {str(token): bias for token, bias in p.logit_bias}
    if p.repetition_penalty != 1.0:
        extra["repetition_penalty"] = p.repetition_penalty
    if p.frequency_penalty:
        extra["frequency_penalty"] = p.frequency_penalty
    if p.presence_penalty:
        extra["presence_penalty"] = p.presence_penalty
    if p.top_k:
        extra["top_k"] = p.top_k
    if p.min_p:
        extra["min_p"] = p.min_p
    return extra


@dataclass(eq=False)
class _Generation:
    req: GenerationRequest
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    produced: int = 0


class VllmCore:
    """An EngineCore over one running `VllmProcess` (started and healthy before the core is made).

    `max_seqs` is what admission lets run at once (the child gets the same `--max-num-seqs`, so vLLM never
    queues internally and our waiting gauge is the truth); `kv_tokens` caps what admitted requests may
    reserve (prompt + max_tokens each); vLLM's real KV use is its own `vllm:kv_cache_usage_perc`.
    """

    def __init__(
        self, name: str, tokenizer: Tokenizer, process: VllmProcess, *, max_seqs: int, context_length: int,
        kv_tokens: int, max_queue: int, observers: list[Observer] | None = None,
        on_queue_time: Callable[[float], None] | None = None, max_restarts: int = 3,
        on_failed: Callable[[str], None] | None = None, health_interval: float = 5.0,
    ) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.process = process
        self.context_length = context_length
        self.observers = list(observers or [])
        self.max_running = max_seqs
        self.kv_budget = kv_tokens
        self.admission = Admission(name, max_seqs=max_seqs, kv_tokens=kv_tokens, slot_capacity=context_length,
                                   max_queue=max_queue, on_queue_time=on_queue_time)
        self.max_restarts = max_restarts
        self.on_failed = on_failed
        self.failed: str | None = None
        self.restarting = False
        self._active: set[_Generation] = set()
        self._clients: dict[asyncio.AbstractEventLoop, VllmClient] = {}
        self._pumps: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones
        # vLLM's own prefix cache, as its usage reports it (prompt_tokens_details.cached_tokens), in tokens.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._closed = threading.Event()
        self._monitor = threading.Thread(target=self._watch, args=(health_interval,), name=f"vllm-watch-{name}",
                                         daemon=True)
        self._monitor.start()

    # ------------------------------------------------------------------ event-loop side

    def check_request(self, req: GenerationRequest) -> None:
        if req.processors:
            raise Unsupported(f"profile {self.name!r} runs on vLLM, which cannot apply this request's logits "
                              "processors (penalties, logit_bias, ...)")
        if req.constraint is not None:
            raise Unsupported(f"profile {self.name!r} runs on vLLM: structured outputs and tool grammars are not "
                              "supported on vLLM profiles yet", param="response_format")

    async def admit(self, n: int = 1, *, max_total_tokens: int = 0) -> Ticket:
        if self.failed is not None:
            raise Unavailable(f"profile {self.name!r}: its vLLM server failed: {self.failed}", retry_after=60)
        if self.restarting or not self.process.running():
            raise Unavailable(f"profile {self.name!r}: its vLLM server is restarting", retry_after=10)
        return await self.admission.admit(n, max(1, max_total_tokens))

    def _client(self) -> VllmClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = VllmClient(self.process.endpoint, self.process.served_name,
                                                      max_connections=max(16, 2 * self.max_running))
        return client

    async def generate(self, ticket: Ticket, req: GenerationRequest) -> AsyncIterator[Step]:
        await ticket.acquire()
        state = _Stream(req, self.tokenizer, record=bool(self.observers) and req.capture_top_k > 0)
        gen = _Generation(req)
        self._active.add(gen)
        pump: asyncio.Task[None] | None = None
        vllm_finished = False  # vLLM ended the generation itself (its stream ends next), not our stop/EOS/abort
        try:
            if req.params.max_tokens == 0 and req.prompt_logprobs is None:
                yield state._finish(Step(""), "length")
                return
            p = req.params
            kwargs = dict(max_tokens=max(1, p.max_tokens), temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                          stop=p.stop, logprobs=state.asked_logprobs, ignore_eos=p.ignore_eos,
                          echo=req.prompt_logprobs is not None)
            if p.max_tokens == 0:  # echo only: vLLM scores the prompt and generates nothing
                kwargs["max_tokens"] = 0
            if extra := sampler_extras(p):
                kwargs["extra"] = extra
            pump = asyncio.create_task(self._pump(gen, req.prompt_ids, kwargs))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)
            first = True
            while True:
                item = await gen.queue.get()
                if item is _END:
                    if state.finish_reason is None:  # the stream ended without a finish reason
                        yield state.abort()
                    return
                if item is _ABORT:
                    yield state.abort()
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, CompletionChunk)
                vllm_finished = vllm_finished or item.finish_reason is not None
                if first and (prompt := state.prompt_step(item)) is not None:
                    first = False
                    if p.max_tokens == 0:
                        prompt.finish_reason = state.finish_reason = "length"
                        yield prompt
                        return
                    yield prompt
                first = False
                steps = state.tokens(item)
                if steps and state.finish_reason is not None and vllm_finished:
                    # vLLM's usage chunk follows its last token: its cached-token count rides on our last step.
                    steps[-1].cached_tokens = await self._cached_tokens(gen)
                for step in steps:
                    gen.produced += step.n_tokens
                    yield step
                if state.finish_reason is not None:
                    if state.record and state.finish_reason in ("stop", "length"):
                        finished = state.finished_generation(self.name)
                        for observe in self.observers:
                            observe(finished)
                    return
        finally:
            try:
                if pump is not None and not pump.done() and vllm_finished:
                    # Finished: vLLM's stream ends right after (the usage chunk and [DONE]); reading it to the end
                    # gives the connection back to the pool without an abort.
                    await asyncio.wait({pump}, timeout=5.0)
                if pump is not None and not pump.done():
                    # Cancelling the pump closes the HTTP stream: vLLM aborts the request. Waited for with
                    # asyncio.wait, which never passes our own cancellation on to the pump: when the client went
                    # away, Starlette's anyio cancel scope re-cancels this task at every await, and an awaited task
                    # inherits each of those — they hit httpcore's close path again and again and left the
                    # connection open (vLLM decoding on; seen with the fake server). If we are being cancelled,
                    # the wait ends at once and the pump finishes closing on its own.
                    pump.cancel()
                    await asyncio.wait({pump})
            finally:
                self._active.discard(gen)
                ticket.give_back()

    async def _cached_tokens(self, gen: _Generation) -> int:
        """The prompt tokens vLLM served from its prefix cache, from the usage chunk that ends its stream (0 when
        it reports none: an older vLLM, or no usage within a second)."""
        cached = 0
        try:
            async with asyncio.timeout(1.0):
                while True:
                    item = await gen.queue.get()
                    if not isinstance(item, CompletionChunk):
                        gen.queue.put_nowait(item)  # _END or an error: the loop after us sees it
                        break
                    if item.usage is not None:
                        details = item.usage.get("prompt_tokens_details") or {}
                        cached = int(details.get("cached_tokens") or 0)
                        break
        except TimeoutError:
            pass
        self.prefix_queries += len(gen.req.prompt_ids)
        self.prefix_hits += cached
        return cached

    async def _pump(self, gen: _Generation, prompt_ids: list[int], kwargs: dict) -> None:
        try:
            async for chunk in self._client().stream_completion(prompt_ids, **kwargs):
                gen.queue.put_nowait(chunk)
            gen.queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except httpx.TransportError as exc:
            # The child died (or is restarting) before our health check noticed: 503 with Retry-After, as
            # admit() says once the watcher has seen it — not a server error.
            gen.queue.put_nowait(Unavailable(f"profile {self.name!r}: its vLLM server is unreachable ({exc!r})",
                                             retry_after=10))
        except Exception as exc:  # vLLM's error answer
            gen.queue.put_nowait(exc)

    def stats(self) -> CoreStats:
        # Read at scrape time from another thread while the loop adds and removes generations.
        for _ in range(3):
            try:
                active = tuple(self._active)
                break
            except RuntimeError:  # "Set changed size during iteration"
                continue
        else:
            active = ()
        used = sum(len(g.req.prompt_ids) + g.produced for g in active)
        return CoreStats(running=len(active), waiting=self.admission.waiting, kv_used_tokens=used,
                         kv_total_tokens=self.kv_budget, max_seqs=self.max_running,
                         prefix_queries=self.prefix_queries, prefix_hits=self.prefix_hits)

    async def drain(self, deadline: float) -> None:
        self.admission.start_draining()
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._active:
            log.warning("profile %s: drain deadline reached, aborting %d generation(s)", self.name, len(self._active))
            for gen in list(self._active):
                gen.queue.put_nowait(_ABORT)
            give_up = time.monotonic() + 10
            while self._active and time.monotonic() < give_up:
                await asyncio.sleep(0.02)

    def close(self) -> None:
        """Stop watching, stop the child (SIGTERM to its process group, then SIGKILL)."""
        self._closed.set()
        self._monitor.join(timeout=10)
        self.process.stop()
        for loop, client in list(self._clients.items()):
            with contextlib.suppress(RuntimeError):  # a closed loop: its connections are gone with the child
                loop.call_soon_threadsafe(lambda c=client: asyncio.ensure_future(c.aclose()))
        self._clients.clear()

    # ------------------------------------------------------------------ checks at load

    def agreement(self, token_ids: list[int], reference_top1: list[int], timeout: float = 600.0) -> float:
        """Teacher-forced top-1 agreement of vLLM (its prompt logprobs' rank-1 tokens) with a reference on the
        same tokens: `reference_top1[i]` is the reference's top token after `token_ids[: i + 1]`."""
        import httpx

        body = {"model": self.process.served_name, "prompt": list(token_ids), "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": 1, "add_special_tokens": False}
        with httpx.Client(transport=self.process.endpoint.sync_transport(), timeout=timeout) as c:
            r = c.post(self.process.base_url + "/v1/completions", json=body)
        if r.status_code != 200:
            raise VllmRequestError(r.status_code, r.text)
        positions = r.json()["choices"][0]["prompt_logprobs"][1:]
        top1 = [next(int(k) for k, v in d.items() if v.get("rank") == 1) for d in positions]
        n = min(len(top1), len(reference_top1))
        return sum(a == b for a, b in zip(top1[:n], reference_top1[:n], strict=True)) / max(1, n)

    def decode_speed(self, prompt_ids: list[int], tokens: int = 32, rounds: int = 3) -> float:
        """Single-stream greedy decode tokens/s through the child (first token excluded), best of `rounds`."""

        async def once() -> float:
            client = VllmClient(self.process.endpoint, self.process.served_name)
            try:
                stamps = []
                async for chunk in client.stream_completion(prompt_ids, max_tokens=tokens, temperature=0.0,
                                                            ignore_eos=True):
                    if chunk.token_ids:
                        stamps.append((time.perf_counter(), len(chunk.token_ids)))
            finally:
                await client.aclose()
            produced = sum(n for _, n in stamps[1:])
            return produced / (stamps[-1][0] - stamps[0][0]) if produced and stamps[-1][0] > stamps[0][0] else 0.0

        return max(asyncio.run(once()) for _ in range(rounds))

    # ------------------------------------------------------------------ health

    def _watch(self, interval: float) -> None:
        """Restart the child when it exits or fails /health three times in a row; give up after max_restarts
        consecutive failed restarts (the profile then answers 503 and is marked failed)."""
        misses = 0
        restarts = 0
        while not self._closed.wait(interval):
            alive = self.process.running()
            if alive and self.process.health(timeout=max(2.0, interval)):
                misses = 0
                restarts = 0
                continue
            misses += 1
            if alive and misses < 3:
                continue
            if self._closed.is_set():
                return
            if restarts >= self.max_restarts:
                self.failed = (f"not healthy after {restarts} restart(s); log {self.process.log_path}:\n"
                               f"{self.process.log_tail(10)}")
                log.error("profile %s: vLLM server failed for good: %s", self.name, self.failed)
                if self.on_failed is not None:
                    self.on_failed(self.failed)
                return
            restarts += 1
            why = "exited" if not alive else "stopped answering /health"
            log.error("profile %s: vLLM server %s; restarting (%d of %d)", self.name, why, restarts, self.max_restarts)
            self.restarting = True
            try:
                self.process.restart()
                misses = 0
            except VllmStartError as exc:
                log.error("profile %s: vLLM restart failed: %s", self.name, exc)
            finally:
                self.restarting = False
