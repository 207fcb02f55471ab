"""The two narrow interfaces every in-process engine implements, and the CPU budget they share.

- `Tokenizer`: text ↔ ids, each token's output bytes, specials and chat template.
- `BatchModel`: a fixed set of KV slots driven by ONE thread; `step(work)` runs one forward over
  several slots (decode rows of many sequences, or a prefill chunk) and returns raw logits.

An `Engine` is both (for llama.cpp the tokenizer lives in the GGUF): loaded weights that hand out batch
models (`new_batch`, what a serving core drives) and single sequences (`new_sequence`, what quality
evaluation and tools drive). Sampling, stop handling, logprobs and cancellation live above engines
(server/runtime/decode.py), so every engine behaves the same for the same logits.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Sequence as Seq
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class Tokenizer(ABC):
    name: str
    context_length: int  # the most tokens one sequence may hold (prompt + completion)
    vocab_size: int
    eos_token_ids: frozenset[int]
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None

    @abstractmethod
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Text → ids; special-token text like `<|im_start|>` becomes its token."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token contributes to the output text (empty for control tokens)."""

    def detokenize(self, ids: Seq[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")


_origins = itertools.count(1)


@dataclass(eq=False)
class Slot:
    """One sequence's KV within a batch model: `id` is its llama.cpp seq_id / cache index.

    Where a model shares KV cells between slots (llama.cpp's unified KV: `share` adds a sequence id to
    existing cells, nothing is copied), positions [0, base) are cells the slot took from others, recorded
    as `segs` (end, origin) runs; its own cells from `base` on carry `origin`. Two slots holding the same
    origin at a position hold the same cell, which is how `BatchModel.used_tokens` counts each cell once.
    """

    id: int
    tokens: list[int] = field(default_factory=list)
    segs: list[tuple[int, int]] = field(default_factory=list)  # (end position, origin) of borrowed runs
    base: int = 0
    origin: int = field(default_factory=lambda: next(_origins))

    def runs(self) -> list[tuple[int, int, int]]:
        """(start, end, origin) of every run of cells the slot holds, in position order."""
        out, start = [], 0
        for end, origin in self.segs:
            out.append((start, end, origin))
            start = end
        if len(self.tokens) > self.base:
            out.append((self.base, len(self.tokens), self.origin))
        return out

    def cut(self, n: int) -> None:
        """Keep the first `n` positions' bookkeeping; later positions get fresh cells (a new origin)."""
        runs = [(s, min(e, n), o) for s, e, o in self.runs() if s < n]
        self.segs = [(e, o) for _, e, o in runs]
        self.base = n
        self.origin = next(_origins)
        del self.tokens[n:]


@dataclass
class Work:
    """One slot's part of a forward: append `ids` to its KV; logits for every id or only the last."""

    slot: Slot
    ids: Seq[int]
    all_logits: bool = False


class BatchModel(ABC):
    """KV slots over shared weights, driven by one thread (a core's scheduler, or a single sequence).

    All slots draw on one pool of `pool_tokens` KV positions; any one slot may grow to `slot_capacity`
    (the model's context) while the pool has room. A slot's KV is freed or truncated only between steps,
    by the thread that runs the steps: that is what guarantees a KV cache is never reused while a forward
    still touches it.
    """

    max_seqs: int  # slot ids: running sequences and idle prefix entries together
    slot_capacity: int  # most tokens one slot holds
    pool_tokens: int  # KV positions all slots share
    max_chunk: int  # most tokens of one slot in one step (prefill chunk size)
    shares_cells: bool = False  # `share` costs no memory (llama.cpp's unified KV); else it copies

    def __init__(self, max_seqs: int) -> None:
        self.max_seqs = max_seqs
        self._free = list(range(max_seqs))  # a heap: the lowest id is reused first
        self._slots: dict[int, Slot] = {}

    def used_tokens(self, slots: Iterable[Slot] | None = None) -> int:
        """KV positions the slots (default: all) hold, a shared cell counted once."""
        chosen = list(self._slots.values() if slots is None else slots)
        if not self.shares_cells:
            return sum(len(s.tokens) for s in chosen)
        spans: dict[int, tuple[int, int]] = {}
        for slot in chosen:
            for start, end, origin in slot.runs():
                old = spans.get(origin)
                spans[origin] = (start, end) if old is None else (old[0], max(old[1], end))
        return sum(end - start for start, end in spans.values())

    @property
    def free_tokens(self) -> int:
        return self.pool_tokens - self.used_tokens()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> Slot:
        if not self._free:
            raise RuntimeError("no free slot")
        slot = Slot(heapq.heappop(self._free))
        self._slots[slot.id] = slot
        return slot

    def release(self, slot: Slot) -> None:
        self.truncate(slot, 0)
        slot.cut(0)
        del self._slots[slot.id]
        heapq.heappush(self._free, slot.id)

    def truncate(self, slot: Slot, n: int) -> None:
        """Keep only the first `n` cached tokens of the slot."""
        if n < len(slot.tokens):
            self._drop_from(slot, n)
            slot.cut(n)

    def share(self, src: Slot, dst: Slot, n: int) -> None:
        """Give the empty slot `dst` the KV of `src`'s first `n` positions (shared cells, or a copy)."""
        if dst.tokens or not 0 < n <= len(src.tokens):
            raise ValueError(f"cannot share {n} positions of slot {src.id} into slot {dst.id}")
        self._share(src, dst, n)
        if self.shares_cells:
            dst.segs = [(e, o) for s, e, o in ((s, min(e, n), o) for s, e, o in src.runs() if s < n)]
            dst.base = n
        dst.tokens = list(src.tokens[:n])
        if not self.shares_cells:
            dst.cut(n)  # copied cells are the slot's own

    @abstractmethod
    def _share(self, src: Slot, dst: Slot, n: int) -> None:
        """Make positions 0..n-1 of `dst`'s KV those of `src` (dst is empty)."""

    @abstractmethod
    def _drop_from(self, slot: Slot, n: int) -> None:
        """Remove cached positions n.. of the slot from the KV cache."""

    def check(self, work: Seq[Work]) -> None:
        for w in work:
            n = len(w.ids)
            if not 0 < n <= self.max_chunk:
                raise ValueError(f"a step takes 1..{self.max_chunk} tokens per slot, got {n}")
            if len(w.slot.tokens) + n > self.slot_capacity:
                raise ValueError(f"slot {w.slot.id} would exceed its {self.slot_capacity} tokens")
        if sum(len(w.ids) for w in work) > self.free_tokens:
            raise KvFull(f"the step needs {sum(len(w.ids) for w in work)} KV positions, {self.free_tokens} free")
        if len({w.slot.id for w in work}) != len(work):
            raise ValueError("a slot appears twice in one step")

    @abstractmethod
    def step(self, work: Seq[Work]) -> list[np.ndarray]:
        """One forward over all `work` items; per item float32 logits [len(ids), vocab] if all_logits
        else [1, vocab] (the last id's). Appends the ids to the slots' `tokens`."""

    def close(self) -> None:  # noqa: B027 - most models free their caches with the garbage collector
        """Free native memory now; unusable afterwards."""


class KvFull(RuntimeError):
    """A step needs more KV positions than the pool has free (the core frees room and runs it again)."""


class Sequence:
    """A single sequence over a one-slot batch model: the API quality evaluation and tools drive."""

    def __init__(self, model: BatchModel) -> None:
        self.model = model
        self.slot = model.acquire()

    @property
    def tokens(self) -> list[int]:
        return self.slot.tokens

    def forward(self, ids: Seq[int], *, all_logits: bool) -> np.ndarray:
        """Append `ids` (at most `max_chunk` of them); logits [len(ids), vocab] or [1, vocab]."""
        return self.model.step([Work(self.slot, list(ids), all_logits)])[0]

    def truncate(self, n: int) -> None:
        """Keep only the first `n` cached tokens."""
        self.model.truncate(self.slot, n)

    def close(self) -> None:
        self.model.close()


class Engine(Tokenizer):
    """Loaded weights + tokenizer; hands out batch models and single sequences."""

    max_batch: int  # most tokens one forward of one sequence takes (prefill chunk size)
    max_slots: int = 4096  # most slot ids one batch model takes

    @abstractmethod
    def new_batch(self, max_seqs: int, slot_capacity: int, pool_tokens: int | None = None) -> BatchModel:
        """`max_seqs` KV slots of up to `slot_capacity` tokens each, sharing `pool_tokens` KV positions
        (None: one slot's worth), for one scheduler thread."""

    def new_sequence(self) -> Sequence:
        """A fresh single sequence of the full context length (its own KV; safe beside a serving core)."""
        return Sequence(self.new_batch(1, self.context_length))

    def new_lane(self, tokens: int) -> BatchModel | None:
        """A one-slot batch model of its own, sized to `tokens`, for a sequence whose logits must not depend
        on what else the pool holds; None where a pooled sequence's rows never depend on that (its KV is
        laid out per sequence, as the PyTorch engine's is)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Free native memory; the engine is unusable afterwards."""


class CpuBudget:
    """Process-wide CPU threads shared by every forward of every profile, handed out first come, first served.

    Each profile's scheduler thread (and each evaluation) runs native forwards with their own thread
    teams; two profiles decoding at once with 2 threads each on 2 cores spin against each other, and
    torch's thread count is process-global (measured: `torch.set_num_threads` in one thread changes
    what every other thread's ops use). So a forward first takes as many units as it runs threads;
    forwards of one `group` (torch) run concurrently only with the same thread count (`tag`).

    A thread inside `background()` (quality evaluation in the server) runs a forward only while no forward
    holds or waits for units and `busy()` (set by the server: requests admitted or queued) is false, so
    traffic never queues behind background work; a background forward already running is not interrupted.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._cond = threading.Condition()
        self._used = 0
        self._queue: deque[object] = deque()
        self._tags: dict[str, tuple[int, int]] = {}  # group → (tag, holders)
        self._local = threading.local()
        self.busy: Callable[[], bool] = lambda: False

    @contextmanager
    def background(self) -> Iterator[None]:
        """Forwards of this thread yield to every other forward and to `busy()` while inside."""
        before = getattr(self._local, "background", False)
        self._local.background = True
        try:
            yield
        finally:
            self._local.background = before

    def configure(self, total: int) -> None:
        with self._cond:
            self.total = max(1, total)
            self._cond.notify_all()

    @contextmanager
    def use(self, n: int, group: str | None = None, tag: int = 0) -> Iterator[int]:
        """Hold min(n, total) units; yields how many were granted (run that many threads)."""
        me = object()
        with self._cond:
            n = max(1, min(n, self.total))
            if getattr(self._local, "background", False):
                # busy() is outside this lock's knowledge: look again every 50 ms.
                while self._queue or self._used or self.busy():
                    self._cond.wait(0.05)
            self._queue.append(me)

            def can_go() -> bool:
                if self._queue[0] is not me or self._used + n > self.total:
                    return False
                held = self._tags.get(group) if group else None
                return held is None or held[0] == tag or held[1] == 0

            self._cond.wait_for(can_go)
            self._queue.popleft()
            self._used += n
            if group:
                held = self._tags.get(group)
                self._tags[group] = (tag, (held[1] if held and held[0] == tag else 0) + 1)
            self._cond.notify_all()  # the next in line may fit beside us
        try:
            yield n
        finally:
            with self._cond:
                self._used -= n
                if group:
                    t, holders = self._tags[group]
                    self._tags[group] = (t, holders - 1)
                self._cond.notify_all()


CPU = CpuBudget(2)


_PRESSURE = (Path("/sys/fs/cgroup/cpu.pressure"), Path("/proc/pressure/cpu"))


def box_is_busy(threshold: float = 20.0) -> bool:
    """CPU contention now: the share of the last 10 s in which some runnable task of this cgroup (else of
    the machine) waited for a CPU (Linux PSI "some avg10", percent); without PSI, a load average above
    our CPU budget. A container's /proc/loadavg is the node's, so PSI of our own cgroup comes first."""
    for path in _PRESSURE:
        try:
            first = path.read_text().split("\n", 1)[0]  # "some avg10=8.89 avg60=... total=..."
            return float(first.split()[1].split("=")[1]) > threshold
        except (OSError, IndexError, ValueError):
            continue
    try:
        return os.getloadavg()[0] > CPU.total - 0.5
    except OSError:  # pragma: no cover
        return False


class ThreadTuner:
    """Picks the thread count of each forward by measurement, per shape of step, and keeps measuring.

    Measured on the shared 2-core box (q4_k_m): with the other core busy, a single-token step took 32 ms
    on 1 OpenMP thread and 2.2 s on 2 (every op ends in a barrier that waits for a descheduled thread);
    on an idle box 2 threads win for batched steps. So each step shape (1, 2-3, 4-7, ... tokens) keeps a
    moving average of its step time per candidate count and uses the fastest. A slower candidate is tried
    again once the steps since its last try took `patience` times its own average, so exploring costs
    about 1/patience of the time (2%), however slow the other option is. A larger team is only tried while
    the box has no CPU contention (`busy()` false): one try on a busy box can cost seconds.
    """

    def __init__(self, candidates: Seq[int], patience: float = 50.0, alpha: float = 0.25,
                 busy: Callable[[], bool] = box_is_busy) -> None:
        self.candidates = sorted(set(candidates))
        self.patience = patience
        self.alpha = alpha
        self.busy = busy
        self._avg: dict[tuple[int, int], float] = {}
        self._since: dict[tuple[int, int], float] = {}  # bucket time spent since this count was last used

    @staticmethod
    def bucket(n_tokens: int) -> int:
        return n_tokens.bit_length()  # 1, 2-3, 4-7, 8-15, ...

    def pick(self, n_tokens: int) -> int:
        if len(self.candidates) == 1:
            return self.candidates[0]
        b = self.bucket(n_tokens)
        tried = [t for t in self.candidates if (b, t) in self._avg]
        if not tried:  # a baseline first: the largest team, unless the box is busy
            return self.candidates[0] if self.busy() else self.candidates[-1]
        best = min(tried, key=lambda t: self._avg[(b, t)])
        for t in self.candidates:
            if t == best:
                continue
            if (b, t) not in self._avg and t < best:
                return t  # a smaller team is tried at once: at worst it is a few times slower
            due = self._since.get((b, t), 0.0) >= self.patience * self._avg.get((b, t), self._avg[(b, best)])
            if due and not (t > best and self.busy()):
                return t
        return best

    def record(self, n_tokens: int, threads: int, seconds: float) -> None:
        b = self.bucket(n_tokens)
        key = (b, threads)
        old = self._avg.get(key)
        self._avg[key] = seconds if old is None else old + self.alpha * (seconds - old)
        for t in self.candidates:
            self._since[(b, t)] = 0.0 if t == threads else self._since.get((b, t), 0.0) + seconds
