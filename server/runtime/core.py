"""The seam between serving and generation: one `EngineCore` per loaded profile, and its admission.

A core owns admission, scheduling, the running sequences, their KV slots, cancellation and drain. The
HTTP layer calls `admit()` before it sends any response byte (so "busy" is a real 429 and "draining" a
real 503, streaming or not), then `generate()` per prompt, and closes the iterator to abort.

`Admission` is the bounded FIFO queue in-process cores share: it counts sequences and KV tokens
against the profile's budget and lives on the event loop (only its `release` is called from other
threads, through the loop). Room comes back explicitly, never through the garbage collector: a finished
generation gives its share back (`Ticket.give_back`), and the ticket's owner releases the rest
(`Ticket.release`, which the serving layer's `Run` does when it closes).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from shrinkserve.server.engines.base import Tokenizer
from shrinkserve.server.runtime.types import Busy, CoreStats, Draining, GenerationRequest, NeverFits, Step


class EngineCore(Protocol):
    tokenizer: Tokenizer
    context_length: int  # the most tokens (prompt + completion) one generation may hold

    async def admit(self, n: int = 1, *, max_total_tokens: int = 0) -> Ticket:
        """Room for `n` generations of at most `max_total_tokens` KV positions each (prompt + max_tokens).

        Raises Busy (→ 429), Draining (→ 503), NeverFits (→ 400) or Unavailable (→ 503, an out-of-process
        engine restarting) before any response byte; may wait in a bounded queue. A core that cannot serve
        some requests also has `check_request(req)`, raising Unsupported (→ 400) before admission.
        """
        ...

    def generate(self, ticket: Ticket, req: GenerationRequest) -> AsyncIterator[Step]:
        """Steps of one generation; closing the iterator early aborts it (its KV slot is freed between steps)."""
        ...

    def stats(self) -> CoreStats: ...

    async def drain(self, deadline: float) -> None:
        """Stop admitting; let running generations finish until `deadline` (time.monotonic()), then abort them."""
        ...

    def close(self) -> None:
        """Stop the core's own threads, then free the engine's memory."""
        ...


@dataclass(eq=False)
class Ticket:
    """Admitted room: `shares` generations that may run at once, each within `tokens` KV positions.

    A request with more prompts than shares runs them as shares come back (`acquire`); whatever is
    not handed back by a finished generation returns with `release()`, which its owner must call once
    on every path (it is idempotent; shares still running come back as their generations end).
    """

    shares: int
    tokens: int
    admission: Admission
    _free: int = field(init=False)
    _returned: bool = field(default=False, init=False)
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque, init=False)

    def __post_init__(self) -> None:
        self._free = self.shares

    @property
    def returned(self) -> bool:
        return self._returned

    async def acquire(self) -> None:
        """One share for a generation about to start (waits while all of the ticket's shares run)."""
        if self._returned:
            raise RuntimeError("this ticket was released")
        while self._free == 0:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut
        self._free -= 1

    def give_back(self) -> None:
        """A generation of this ticket has freed its slot."""
        self._free += 1
        if self._returned:
            self._free -= 1
            self.admission.release(1, self.tokens)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def release(self) -> None:
        """The request is done with the ticket: return every share no generation holds."""
        if not self._returned:
            self._returned = True
            self.admission.release(self._free, self.tokens)
            self._free = 0


class Admission:
    """A bounded FIFO in front of a budget of sequences and KV tokens; event-loop only."""

    def __init__(self, name: str, *, max_seqs: int, kv_tokens: int, slot_capacity: int, max_queue: int,
                 on_queue_time: Callable[[float], None] | None = None) -> None:
        self.name = name
        self.max_seqs = max_seqs
        self.kv_tokens = kv_tokens
        self.slot_capacity = slot_capacity
        self.max_queue = max_queue
        self.on_queue_time = on_queue_time
        self.seqs_held = 0
        self.tokens_held = 0
        self.draining = False
        self._queue: deque[tuple[int, int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _fits(self, seqs: int, tokens: int) -> bool:
        return self.seqs_held + seqs <= self.max_seqs and self.tokens_held + seqs * tokens <= self.kv_tokens

    async def admit(self, n: int, max_total_tokens: int) -> Ticket:
        if self.draining:
            raise Draining(f"profile {self.name!r} is shutting down")
        if max_total_tokens > self.slot_capacity:
            raise NeverFits(f"This model's maximum context length is {self.slot_capacity} tokens. However, "
                            f"you requested {max_total_tokens} tokens (prompt + max_tokens).")
        shares = max(1, min(n, self.max_seqs, self.kv_tokens // max(1, max_total_tokens)))
        t0 = time.perf_counter()
        if not self._queue and self._fits(shares, max_total_tokens):
            self._take(shares, max_total_tokens)
        else:
            if len(self._queue) >= self.max_queue:
                raise Busy(f"profile {self.name!r} is at capacity ({self.seqs_held} of {self.max_seqs} sequences "
                           f"running, {len(self._queue)} waiting); retry later")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (shares, max_total_tokens, fut)
            self._queue.append(entry)
            try:
                await fut  # _grant() took the budget for us
            except BaseException:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self.release(shares, max_total_tokens)  # granted, then cancelled before we could use it
                elif entry in self._queue:
                    self._queue.remove(entry)
                    self._grant()
                raise
        if self.on_queue_time is not None:
            self.on_queue_time(time.perf_counter() - t0)
        return Ticket(shares, max_total_tokens, self)

    def _take(self, seqs: int, tokens: int) -> None:
        self.seqs_held += seqs
        self.tokens_held += seqs * tokens

    def release(self, seqs: int, tokens: int) -> None:
        """Give back `seqs` sequences of `tokens` KV positions each, and admit whoever now fits."""
        self.seqs_held -= seqs
        self.tokens_held -= seqs * tokens
        self._grant()

    def _grant(self) -> None:
        while self._queue:
            seqs, tokens, fut = self._queue[0]
            if fut.done():
                self._queue.popleft()
                continue
            if not self._fits(seqs, tokens):
                return
            self._queue.popleft()
            self._take(seqs, tokens)
            fut.set_result(None)

    def start_draining(self) -> None:
        self.draining = True
        while self._queue:
            _, _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(Draining(f"profile {self.name!r} is shutting down"))
