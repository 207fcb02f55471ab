"""`BatchingCore`: one scheduler thread per profile, continuous batching over a `BatchModel`.

Each iteration of the scheduler:
1. frees the slots of cancelled sequences (between steps: no forward touches them any more);
2. starts admitted sequences in arrival order, each once its uncached tokens fit in the profile's KV pool:
   the longest prompt prefix it shares with any slot holding KV (a running sequence, or an idle entry a
   finished one left) is taken over (server/runtime/prefix.py) and only the rest is prefilled;
3. prefills: prompts are cut at fixed boundaries (compression/scoring.chunk_ends), at most `max_chunk`
   prompt tokens per iteration so running streams keep their pace; a seeded sequence's chunks run alone,
   every other prompt's next chunk joins the decode forward;
4. decodes: ONE forward over every decoding sequence (and the joining prompt chunks), each row advanced
   by its own `DecodeState` (seeded RNG, stop strings, logprobs, capture top-k);
5. hands the steps to the event loop in one call.

KV pool: every slot may grow to the model's context while the pool has room. Finished sequences' KV stays
as idle prefix entries up to `idle_kv_tokens` positions (least recently used first out). Before a forward,
room is made by evicting idle prefix entries (least recently used first), then by preempting the newest running
sequence: its KV is dropped and it waits in its arrival place; when it starts again it recomputes its
prompt and the tokens it had fed (with the prefix cache's help) and decodes on with the same decode state
(sampler RNG, stop text), so no generation ever fails or stalls for lack of KV, and the oldest one waiting
is never overtaken.

Determinism: a profile's batch invariance is probed at load (`probe_batch_invariance`): is a
sequence's logits row bit-identical alone and inside a batch of other sequences of other lengths, in
another slot? Where it holds, seeded requests ride in the batch; where it does not, each seeded
sequence gets its own forward in the same step, so the same request with the same seed gives the same
text at any load. Unseeded requests always batch. A core with one slot (`scheduler: serial`) runs one
sequence at a time. Prefix reuse follows the same rule (server/runtime/prefix.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from shrinkserve.compression.scoring import chunk_ends
from shrinkserve.server.engines.base import BatchModel, Engine, KvFull, Slot, Work
from shrinkserve.server.runtime.core import Admission, Ticket
from shrinkserve.server.runtime.decode import DecodeState
from shrinkserve.server.runtime.prefix import best_match, probe_prefix_reuse
from shrinkserve.server.runtime.sampling import log_softmax
from shrinkserve.server.runtime.types import CoreStats, FinishedGeneration, GenerationRequest, Step

log = logging.getLogger("shrinkserve.core")

Observer = Callable[[FinishedGeneration], None]

_END = object()  # the consumer's queue ends here


@dataclass(eq=False)
class _Seq:
    """One generation inside the core. Fields below `state` belong to the scheduler thread."""

    req: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[object]
    ticket: Ticket
    cancelled: bool = False  # set by the consumer (any thread), read by the scheduler
    state: DecodeState | None = None
    arrival: int = 0
    slot: Slot | None = None
    lane: BatchModel | None = None  # a batch model of its own (Engine.new_lane) instead of the pool
    feed: list[int] = field(default_factory=list)  # what the prefill covers: the prompt, or all fed tokens on resume
    ends: list[int] = field(default_factory=list)  # prefill chunk ends still to run
    prompt_rows: list[np.ndarray] = field(default_factory=list)
    pending: int | None = None  # the next token to feed (decoding)
    resume: int | None = None  # preempted while decoding: the token to feed once `feed` is recomputed
    started: bool = False  # the prompt was prefilled once (its first step went out)
    exact: int = 0  # leading positions of the slot holding canonical KV (server/runtime/prefix.py)
    cached: int = 0  # prompt tokens whose KV was reused, reported on the first step
    reported: bool = False
    looked_up: bool = False  # counted in the prefix-cache metrics

    @property
    def solo(self) -> bool:
        return self.req.params.seed is not None


@dataclass(eq=False)
class _Idle:
    """A finished sequence's KV, kept in its slot for later prompts that share its prefix; evicted first."""

    slot: Slot
    exact: int
    tick: int


def probe_batch_invariance(model: BatchModel, tokens: list[int], steps: int = 8, seqs: int | None = None) -> bool:
    """Is a sequence's logits row bit-identical decoded alone and inside a full batch (another slot, the
    others at other lengths, one of them feeding a prompt chunk as the scheduler's mixed steps do)? Runs on
    the loading thread before the scheduler starts; leaves every slot free.

    A difference shows only for some inputs (measured on this model's Q4_K_M: the first 2 decode rows
    matched, the 3rd did not), so it decodes `steps` rows; a probe can only find a difference, never
    prove there is none.
    """
    chunk = 4  # the prompt chunk one of the other sequences feeds at each step
    seqs = min(seqs or model.max_seqs, model.max_seqs)
    fits = (model.pool_tokens - steps * chunk) // max(1, seqs) - steps  # every sequence's share of the pool
    tokens = tokens[: min(model.max_chunk, model.slot_capacity - steps * chunk, fits)]
    if seqs < 2 or len(tokens) < 4:
        return True
    feed = [tokens[i % len(tokens)] for i in range(steps)]

    def run(n_others: int) -> list[np.ndarray]:
        others = [model.acquire() for _ in range(n_others)]  # the probed sequence gets a higher slot id
        me = model.acquire()
        try:
            if others:  # other lengths, so attention spans differ across the batch
                model.step([Work(s, tokens[: 1 + (i * 5) % (len(tokens) - 1)]) for i, s in enumerate(others)])
            rows = [model.step([Work(me, tokens)])[0][-1]]
            for t in feed:
                work = [Work(me, [t])] + [Work(s, [t] * (chunk if i == 0 else 1)) for i, s in enumerate(others)]
                rows.append(model.step(work)[0][-1])
            return rows
        finally:
            for s in [*others, me]:
                model.release(s)

    solo, batched = run(0), run(seqs - 1)
    return all(np.array_equal(a, b) for a, b in zip(solo, batched, strict=True))


class BatchingCore:
    """An EngineCore for in-process engines (llama.cpp, PyTorch)."""

    def __init__(
        self, name: str, engine: Engine, *, max_seqs: int, slot_capacity: int, kv_tokens: int | None = None,
        max_queue: int, observers: list[Observer] | None = None,
        on_queue_time: Callable[[float], None] | None = None, probe: bool = True, prefix_slots: int | None = None,
        idle_kv_tokens: int | None = None,
    ) -> None:
        self.name = name
        self.tokenizer = engine
        self.engine = engine
        # Slot ids beyond the running sequences hold idle prefix entries (finished sequences' KV).
        spare = max(0, min(max_seqs if prefix_slots is None else prefix_slots, engine.max_slots - max_seqs))
        self.model = engine.new_batch(max_seqs + spare, slot_capacity, kv_tokens or slot_capacity)
        self.context_length = min(self.model.slot_capacity, self.model.pool_tokens)
        self.observers = list(observers or [])
        self.max_running = max_seqs
        self.kv_budget = self.model.pool_tokens
        self.idle_kv_tokens = idle_kv_tokens  # None: idle entries stay until the room is needed
        # Admission counts sequences only: the pool is managed by what sequences actually hold (a sequence
        # starts when its uncached prompt fits; one is preempted when decoding runs out of room).
        self.admission = Admission(name, max_seqs=self.max_running, kv_tokens=self.max_running * self.context_length,
                                   slot_capacity=self.context_length, max_queue=max_queue,
                                   on_queue_time=on_queue_time)
        self.batch_invariant: bool | None = None
        self.reuse_any = False  # any prefix boundary is exact (else seeded requests reuse whole chunks only)
        probe_ids = engine.tokenize("The quick brown fox jumps over the lazy dog near the river bank")
        warm = self.model.acquire()  # touch every weight now, not in the first request
        try:
            self.model.step([Work(warm, (probe_ids or [0])[:1])])
        finally:
            self.model.release(warm)
        if probe and max_seqs > 1:
            t0 = time.perf_counter()
            self.batch_invariant = probe_batch_invariance(self.model, probe_ids, seqs=max_seqs)
            self.reuse_any = self.batch_invariant and probe_prefix_reuse(self.model, probe_ids)
            log.info("profile %s: batch invariance %s; prefix reuse exact at %s (probes %.0f ms)", name,
                     "holds: seeded requests ride in the batch" if self.batch_invariant else
                     "does not hold: seeded requests get their own forward",
                     "any token" if self.reuse_any else "whole prefill chunks for seeded requests",
                     1000 * (time.perf_counter() - t0))
        self._cond = threading.Condition()
        self._inbox: list[_Seq] = []
        self._running: list[_Seq] = []  # admitted, in arrival order: with a slot, or waiting for room
        self._idle: dict[int, _Idle] = {}  # slot id → a finished sequence's KV kept for reuse
        self._tick = 0  # LRU clock of idle entries
        self._arrivals = 0
        self._stop = False
        self._abort_all = False
        self._kv_used = 0
        self._waiting_room = 0  # admitted sequences waiting for KV room (for stats, any thread)
        self._n_running = 0  # sequences submitted and not yet freed (for stats, any thread)
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache (vLLM's counters, in tokens)
        self.prefix_hits = 0  # of those, tokens whose KV was reused
        self.preemptions = 0
        self._thread = threading.Thread(target=self._run, name=f"core-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event-loop side

    async def admit(self, n: int = 1, *, max_total_tokens: int = 0) -> Ticket:
        return await self.admission.admit(n, max(1, max_total_tokens))

    async def generate(self, ticket: Ticket, req: GenerationRequest) -> AsyncIterator[Step]:
        """Hand the request to the scheduler thread and relay its steps; leaving early cancels it (its slot
        is freed between steps) and the ticket's share comes back once the slot is free."""
        await ticket.acquire()
        loop = asyncio.get_running_loop()
        seq = _Seq(req, loop, asyncio.Queue(), ticket)
        with self._cond:
            if self._stop:
                ticket.give_back()
                raise RuntimeError(f"profile {self.name!r} is closed")
            self._inbox.append(seq)
            self._n_running += 1
            self._cond.notify()
        finished = False
        try:
            while True:
                item = await seq.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                assert isinstance(item, Step)
                if item.finish_reason is not None:
                    finished = True
                yield item
        finally:
            if not finished:
                with self._cond:
                    seq.cancelled = True
                    self._cond.notify()

    def stats(self) -> CoreStats:
        waiting = self._waiting_room
        return CoreStats(running=self._n_running - waiting, waiting=self.admission.waiting + waiting,
                         kv_used_tokens=self._kv_used, kv_total_tokens=self.kv_budget, max_seqs=self.max_running,
                         batch_invariant=self.batch_invariant, prefix_queries=self.prefix_queries,
                         prefix_hits=self.prefix_hits, preemptions=self.preemptions)

    async def drain(self, deadline: float) -> None:
        self.admission.start_draining()
        while self._n_running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._n_running:
            log.warning("profile %s: drain deadline reached, aborting %d generation(s)", self.name, self._n_running)
            with self._cond:
                self._abort_all = True
                self._cond.notify()
            while self._n_running:
                await asyncio.sleep(0.02)

    def close(self) -> None:
        """Stop the scheduler thread (after its current step), then free the KV and the engine."""
        with self._cond:
            self._stop = True
            self._abort_all = True
            self._cond.notify()
        self._thread.join()
        self.model.close()
        self.engine.close()

    # ------------------------------------------------------------------ scheduler thread

    def _run(self) -> None:
        out: list[tuple[_Seq, object]] = []
        while True:
            with self._cond:
                while not (self._inbox or self._running or self._stop):
                    self._cond.wait()
                if self._stop and not self._running and not self._inbox:
                    return
                new, self._inbox = self._inbox, []
                abort_all = self._abort_all
            for seq in new:
                seq.arrival = self._arrivals
                self._arrivals += 1
            self._running.extend(new)
            try:
                self._iteration(out, abort_all)
            except Exception as exc:  # anything else fails what runs, never the core
                log.exception("profile %s: scheduler iteration failed", self.name)
                self._fail(list(self._running), exc, out)
            self._kv_used = self.model.used_tokens([s.slot for s in self._pooled() if s.slot is not None])
            self._waiting_room = sum(s.slot is None for s in self._running)
            if out:
                self._deliver(out)
                out = []
            elif self._waiting_room == len(self._running) and not self._inbox:
                # Nothing could start (room frees only when a consumer leaves): wait for news, not spin.
                with self._cond:
                    self._cond.wait(0.05)

    def _iteration(self, out: list[tuple[_Seq, object]], abort_all: bool) -> None:
        model = self.model
        # 1. cancelled and aborted sequences leave between steps (a preempted one holds nothing)
        for seq in list(self._running):
            if seq.cancelled or abort_all:
                if abort_all and not seq.cancelled:
                    self._emit(seq, seq.state.abort() if seq.state else Step("", finish_reason="abort"), out)
                self._free(seq, out)
        # 2. waiting sequences start in arrival order, each once its uncached tokens fit: the oldest one
        #    waiting is never overtaken, so it cannot starve
        active = [s for s in self._running if s.slot is not None]
        for seq in self._running:
            if seq.slot is not None:
                continue
            if len(active) >= self.max_running or not self._start(seq, running=len(active)):
                break
            active.append(seq)
        active.sort(key=lambda s: s.arrival)
        # 3. prefill, at most max_chunk prompt tokens per iteration. A seeded sequence's prompt runs alone
        #    (the KV it leaves must not depend on what else shared the forward); the next chunk of every
        #    other prompt joins the decode forward below. Measured on 8 prompts of ~58 tokens: one forward
        #    instead of eight was 1.7x faster on the PyTorch engine (bf16) and 1.05-1.17x on llama.cpp
        #    (Q4_K_M), and a prompt chunk riding with 7 decode rows cost 1.4x less than two forwards (torch).
        budget = model.max_chunk
        joining: list[_Seq] = []
        joined = 0  # prompt tokens in the shared forward: at most max_chunk beside the decode rows (llama.cpp's
        #             batch holds max_chunk + slots tokens; a step past it wrote beyond the llama_batch)
        for seq in active:
            if budget <= 0:
                break
            if not seq.ends or seq.slot is None:
                continue
            if seq.solo:
                while seq.ends and budget > 0 and seq.slot is not None:
                    budget -= self._run_group([seq], out)
            else:
                size = self._need(seq)
                if joined + size > model.max_chunk:
                    break  # in arrival order: it goes first in the next iteration
                joining.append(seq)
                joined += size
                budget -= size
        # 4. ONE forward over every decoding sequence and the joining prompt chunks (seeded sequences alone
        #    where batching changes logits)
        decoding = [s for s in self._running if s.pending is not None and not s.cancelled and s.slot is not None]
        shared = joining + [s for s in decoding if not (s.solo and self.batch_invariant is False)]
        groups = [[s] for s in decoding if s.solo and self.batch_invariant is False]
        if shared:
            groups.insert(0, shared)
        for group in groups:
            self._run_group(group, out)

    # ------------------------------------------------------------------ KV room: prefix reuse, eviction, preemption

    def _start(self, seq: _Seq, running: int) -> bool:
        """Give a waiting sequence a slot, reusing the longest cached prefix it may; False when its uncached
        tokens do not fit yet, with room for the `running` sequences to decode while it prefills."""
        model = self.model
        if seq.state is None:
            # Captured or not was decided at admission (`capture_top_k`): a row nobody records does no
            # log-softmax or top-k over the vocabulary.
            record = bool(self.observers) and seq.req.capture_top_k > 0
            seq.state = DecodeState(seq.req, self.tokenizer, capacity=self.context_length, record=record)
            seq.feed = list(seq.req.prompt_ids)
        if seq.solo and self.batch_invariant is False and not seq.looked_up and self._take_lane(seq):
            return True
        rows_needed = seq.req.prompt_logprobs is not None and not seq.started  # echo needs every prompt row
        strict = seq.solo and not self.reuse_any
        match = None if rows_needed else best_match(
            seq.feed, self._candidates(), strict=strict, chunk=model.max_chunk)
        keep = {match.slot.id} if match is not None else set()
        uncached = len(seq.feed) - (match.tokens if match else 0)
        reserve = running * (1 + -(-uncached // model.max_chunk))
        need = uncached + reserve
        if not self._make_room(need, keep) or (not model.free_slots and not self._evict_idle(keep)):
            if match is None or not self._make_room(len(seq.feed) + reserve, set()):
                return False
            match = None  # the cached prefix itself had to go
            if not model.free_slots and not self._evict_idle(set()):
                return False
        if match is not None and not model.shares_cells and match.slot.id in self._idle:
            # A copying engine (PyTorch) takes the idle entry over instead of copying it.
            entry = self._idle.pop(match.slot.id)
            model.truncate(entry.slot, match.tokens)
            seq.slot, seq.exact = entry.slot, min(entry.exact, match.tokens) // model.max_chunk * model.max_chunk
        else:
            seq.slot = model.acquire()
            seq.exact = 0
            if match is not None:
                src_exact = self._exact_of(match.slot)
                model.share(match.slot, seq.slot, match.tokens)
                seq.exact = min(src_exact, match.tokens) // model.max_chunk * model.max_chunk
                if match.slot.id in self._idle:
                    self._tick += 1
                    self._idle[match.slot.id].tick = self._tick
        reused = match.tokens if match else 0
        seq.ends = [e for e in chunk_ends(len(seq.feed), model.max_chunk) if e > reused]
        seq.prompt_rows = []
        if not seq.reported:
            seq.cached = reused
        if not seq.looked_up:
            seq.looked_up = True
            self.prefix_queries += len(seq.req.prompt_ids)
            self.prefix_hits += reused
        return True

    def _take_lane(self, seq: _Seq) -> bool:
        """A seeded sequence on a profile whose rows depend on the pool's other contents runs in a lane of its
        own where the engine has them (llama.cpp): cold, same layout every time, never preempted."""
        try:
            lane = self.engine.new_lane(seq.req.max_total_tokens)
        except Exception:  # no memory for one: the pool serves it, deterministic or not
            log.exception("profile %s: no lane for a seeded sequence; it runs in the pool", self.name)
            return False
        if lane is None:
            return False
        seq.lane, seq.slot = lane, lane.acquire()
        seq.ends = chunk_ends(len(seq.feed), lane.max_chunk)
        seq.looked_up = True
        self.prefix_queries += len(seq.req.prompt_ids)
        return True

    def _candidates(self) -> list[tuple[Slot, int]]:
        """Every slot holding KV (running sequences and idle entries), with its canonical length."""
        out = [(e.slot, e.exact) for e in self._idle.values()]
        out += [(s.slot, s.exact) for s in self._running if s.slot is not None and s.lane is None and s.slot.tokens]
        return out

    def _exact_of(self, slot: Slot) -> int:
        if slot.id in self._idle:
            return self._idle[slot.id].exact
        return next((s.exact for s in self._running if s.slot is slot), 0)

    def _make_room(self, need: int, keep: set[int]) -> bool:
        """Evict idle entries (least recently used first, never those in `keep`) until `need` positions are free."""
        while self.model.free_tokens < need:
            if not self._evict_idle(keep):
                return False
        return True

    def _evict_idle(self, keep: set[int]) -> bool:
        victims = [e for e in self._idle.values() if e.slot.id not in keep]
        if not victims:
            return False
        entry = min(victims, key=lambda e: e.tick)
        del self._idle[entry.slot.id]
        self.model.release(entry.slot)
        return True

    def _preempt(self, seq: _Seq) -> None:
        """Drop a running sequence's KV; it waits (in its arrival place) and recomputes it later. Its decode
        state (sampler RNG, stop text, counters) stays, so it resumes the text it would have written."""
        assert seq.slot is not None and seq.lane is None
        if seq.pending is not None:  # decoding: recompute every fed token, then feed the sampled one
            seq.feed = list(seq.slot.tokens)
            seq.resume, seq.pending = seq.pending, None
        self.model.release(seq.slot)
        seq.slot, seq.ends, seq.prompt_rows, seq.exact = None, [], [], 0
        self.preemptions += 1
        log.info("profile %s: preempted a sequence of %d tokens (KV pool full)", self.name, len(seq.feed))

    def _need(self, seq: _Seq) -> int:
        """KV positions the sequence's next work item appends."""
        assert seq.slot is not None
        return 1 if seq.pending is not None else seq.ends[0] - len(seq.slot.tokens)

    def _fit(self, group: list[_Seq]) -> list[_Seq]:
        """Make room for the group's step: idle entries go first, then the newest running sequences (which
        may be in the group: they leave it)."""
        while group and not self._make_room(sum(self._need(s) for s in group), set()):
            victim = max(self._pooled(), key=lambda s: s.arrival)
            self._preempt(victim)
            group = [s for s in group if s is not victim]
        return group

    def _pooled(self) -> list[_Seq]:
        return [s for s in self._running if s.slot is not None and s.lane is None]

    def _run_group(self, group: list[_Seq], out: list[tuple[_Seq, object]]) -> int:
        """One forward over the group's next work items (a lane's sequence is always alone in its group);
        returns the tokens it fed."""
        group = [s for s in group if s.slot is not None]
        lane = group[0].lane if len(group) == 1 else None
        model = lane or self.model
        if lane is None:
            group = self._fit(group)
        for _ in range(2 * self.model.max_seqs + 2):  # llama.cpp may find no room for a fragmented batch
            if not group:
                return 0
            work = [self._work(s) for s in group]
            try:
                rows = model.step(work)
                break
            except KvFull:
                if lane is not None:
                    self._fail(group, KvFull("a lane ran out of its own KV"), out)
                    return 0
                if not self._evict_idle(set()):
                    victim = max(self._pooled(), key=lambda s: s.arrival)
                    self._preempt(victim)
                    group = [s for s in group if s is not victim]
            except Exception as exc:  # a failed forward fails the sequences it carried
                self._fail(group, exc, out)
                return 0
        else:
            self._fail(group, KvFull("no KV room for the step"), out)
            return 0
        for seq, w, row in zip(group, work, rows, strict=True):
            try:
                if seq.pending is None:  # a prompt chunk
                    seq.ends.pop(0)
                    start = len(w.slot.tokens) - len(w.ids)
                    if len(group) == 1 and len(w.ids) == model.max_chunk and seq.exact == start:
                        seq.exact = len(w.slot.tokens)  # a whole chunk, from a canonical start, alone
                    self._chunk_done(seq, w, row, out)
                else:
                    self._advance(seq, row[-1], out)
            except Exception as exc:  # e.g. a request's own logits processor: only that sequence fails
                self._fail([seq], exc, out)
        return sum(len(w.ids) for w in work)

    def _work(self, seq: _Seq) -> Work:
        """The sequence's part of the next forward: its next prompt chunk, or the token it decodes."""
        assert seq.slot is not None
        if seq.pending is not None:
            return Work(seq.slot, [seq.pending])
        start, end = len(seq.slot.tokens), seq.ends[0]
        return Work(seq.slot, seq.feed[start:end], all_logits=seq.req.prompt_logprobs is not None and not seq.started)

    def _chunk_done(self, seq: _Seq, work: Work, rows: np.ndarray, out: list[tuple[_Seq, object]]) -> None:
        if work.all_logits:
            seq.prompt_rows.append(log_softmax(rows))
        if seq.ends:
            return
        if seq.resume is not None:  # a preempted sequence has its KV back: decoding goes on
            seq.pending, seq.resume = seq.resume, None
        elif not seq.started:
            self._prefilled(seq, rows[-1], out)

    def _prefilled(self, seq: _Seq, last_row: np.ndarray, out: list[tuple[_Seq, object]]) -> None:
        assert seq.state is not None
        seq.started = True
        prompt_lp = np.concatenate(seq.prompt_rows)[:-1] if seq.prompt_rows else None
        seq.prompt_rows = []
        first = seq.state.start(prompt_lp)
        if first is not None:
            self._emit(seq, first, out)
        if seq.state.finished:
            self._free(seq, out, keep=True)
            return
        self._advance(seq, last_row, out)

    def _advance(self, seq: _Seq, row: np.ndarray, out: list[tuple[_Seq, object]]) -> None:
        assert seq.state is not None
        step, token = seq.state.advance(row)
        self._emit(seq, step, out)
        seq.pending = token
        if token is None:
            if seq.state.record and step.finish_reason in ("stop", "length"):
                finished = seq.state.finished_generation(self.name)
                for observe in self.observers:
                    observe(finished)
            self._free(seq, out, keep=True)

    def _emit(self, seq: _Seq, step: Step, out: list[tuple[_Seq, object]]) -> None:
        if not seq.reported:
            step.cached_tokens, seq.reported = seq.cached, True
        out.append((seq, step))

    def _fail(self, seqs: list[_Seq], exc: Exception, out: list[tuple[_Seq, object]]) -> None:
        log.error("profile %s: %d sequence(s) failed: %s: %s", self.name, len(seqs), type(exc).__name__, exc)
        for seq in seqs:
            if seq in self._running:
                out.append((seq, exc))
                self._free(seq, out)

    def _free(self, seq: _Seq, out: list[tuple[_Seq, object]], keep: bool = False) -> None:
        """The sequence leaves; a finished one's KV stays as an idle prefix entry (`keep`)."""
        if seq.lane is not None:
            seq.lane.close()  # a lane's memory goes back at once
            seq.lane = seq.slot = None
        elif seq.slot is not None:
            if keep and seq.slot.tokens:
                self._tick += 1
                self._idle[seq.slot.id] = _Idle(seq.slot, seq.exact, self._tick)
            else:
                self.model.release(seq.slot)
            seq.slot = None
        seq.pending = None
        if seq in self._running:
            self._running.remove(seq)
        self._trim_idle()
        out.append((seq, _END))

    def _idle_cells(self) -> int:
        """KV positions held by idle entries alone (cells a running sequence shares are not counted)."""
        running = [s.slot for s in self._running if s.slot is not None and s.lane is None]
        return self.model.used_tokens() - self.model.used_tokens(running)

    def _trim_idle(self) -> None:
        """Drop least recently used idle entries until they hold at most `idle_kv_tokens` positions."""
        if self.idle_kv_tokens is None:
            return
        while self._idle and self._idle_cells() > self.idle_kv_tokens:
            self._evict_idle(set())

    def _deliver(self, out: list[tuple[_Seq, object]]) -> None:
        """Hand this iteration's steps to the event loop(s) in one call each; `_END` also returns the share."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Seq, object]]] = {}
        for seq, item in out:
            by_loop.setdefault(seq.loop, []).append((seq, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop (shutdown): nobody listens any more
                loop.call_soon_threadsafe(self._on_loop, items)

    def _on_loop(self, items: list[tuple[_Seq, object]]) -> None:
        for seq, item in items:
            seq.queue.put_nowait(item)
            if item is _END:
                with self._cond:
                    self._n_running -= 1
                seq.ticket.give_back()
