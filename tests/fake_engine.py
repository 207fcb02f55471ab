"""A fake in-process engine: a deterministic logits table over a 32-token vocabulary, for scheduler and
decode-state unit tests that need no model.

Each row depends only on the slot's own tokens (so batching changes nothing: batch-invariant), unless
`invariant=False`, where a row computed inside a batch of several slots prefers "z" by a wide margin
(like a real kernel whose last bits depend on batch size, only loud enough to change greedy choices).
A prompt may carry a script: greedy decoding then follows it token by token.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence

import numpy as np

from shrinkserve.server.engines.base import BatchModel, Engine, Slot, Work

EOS = 0
PIECES: list[bytes] = [b""] + [bytes([c]) for c in range(ord("a"), ord("z") + 1)] + [
    b"\xc3", b"\xa9", b" ", b"!", "€".encode()]  # 27, 28: the two halves of "é"; 31: a 3-byte character
VOCAB = len(PIECES)  # 32
Z = 26


def ids_of(text: str) -> list[int]:
    """Token ids spelling `text` with the fake vocabulary ("é" becomes its two byte tokens)."""
    out: list[int] = []
    for ch in text.lower():
        if ch == "é":
            out += [27, 28]
        elif ch.encode() in PIECES:
            out.append(PIECES.index(ch.encode()))
        else:
            out.append(29)  # anything else reads as a space
    return out


class FakeBatch(BatchModel):
    """Shares cells like llama.cpp's unified KV (`shares_cells`), unless the engine says otherwise."""

    def __init__(self, engine: FakeEngine, max_seqs: int, slot_capacity: int, pool_tokens: int) -> None:
        super().__init__(max_seqs)
        self.engine = engine
        self.slot_capacity = slot_capacity
        self.pool_tokens = pool_tokens
        self.shares_cells = engine.shares_cells
        self.max_chunk = engine.max_batch
        self.shared: list[tuple[int, int, int]] = []  # (src id, dst id, positions) of every share
        self.forwards: list[list[tuple[int, int]]] = []  # per step: (slot id, tokens) of each work item
        self.released: list[int] = []
        self.blocked = threading.Event()  # a step is waiting on engine.gate
        self.closed = False

    def _drop_from(self, slot: Slot, n: int) -> None:
        if n == 0:
            self.released.append(slot.id)

    def _share(self, src: Slot, dst: Slot, n: int) -> None:
        self.shared.append((src.id, dst.id, n))

    def row(self, history: Sequence[int], batched: bool) -> np.ndarray:
        key = hashlib.sha256(np.asarray([*history[-4:], len(history)], dtype=np.int64).tobytes()).digest()
        row = np.random.default_rng(int.from_bytes(key[:8], "little")).standard_normal(VOCAB).astype(np.float32)
        row[EOS] -= 4.0  # EOS only when scripted or sampled by chance
        script = self.engine.scripts.get(tuple(history[: self.engine.prompt_len(history)]))
        if script is not None:
            pos = len(history) - self.engine.prompt_len(history)
            if pos < len(script):
                row[script[pos]] += 30.0
        if batched and not self.engine.invariant:
            row[Z] += 60.0
        return row

    def step(self, work: Sequence[Work]) -> list[np.ndarray]:
        self.check(work)
        gate = self.engine.gate
        if gate is not None:
            self.blocked.set()
            gate.wait()
            self.blocked.clear()
        if self.engine.step_delay:
            time.sleep(self.engine.step_delay)
        self.forwards.append([(w.slot.id, len(w.ids)) for w in work])
        batched = len(work) > 1
        out = []
        for w in work:
            rows = []
            history = list(w.slot.tokens)
            for t in w.ids:
                history.append(t)
                rows.append(self.row(history, batched))
            w.slot.tokens.extend(w.ids)
            out.append(np.stack(rows) if w.all_logits else rows[-1][None, :])
        return out

    def close(self) -> None:
        self.closed = True


class FakeEngine(Engine):
    name = "fake"

    def __init__(self, *, invariant: bool = True, context_length: int = 256, max_batch: int = 8,
                 shares_cells: bool = True, lanes: bool = False) -> None:
        self.invariant = invariant
        self.shares_cells = shares_cells
        self.lanes = lanes  # new_lane gives a one-slot batch model of its own (as llama.cpp's engine does)
        self.context_length = context_length
        self.vocab_size = VOCAB
        self.max_batch = max_batch
        self.eos_token_ids = frozenset({EOS})
        self.bos_token = None
        self.eos_token = None
        self.chat_template = None
        self.scripts: dict[tuple[int, ...], list[int]] = {}
        self._prompt_lens: set[int] = set()
        self.gate: threading.Event | None = None  # when set to an unset Event, every step blocks on it
        self.step_delay = 0.0
        self.batches: list[FakeBatch] = []
        self.lane_batches: list[FakeBatch] = []
        self.closed = False

    def script(self, prompt: list[int], continuation: list[int]) -> None:
        """Greedy decoding after `prompt` produces `continuation`."""
        self.scripts[tuple(prompt)] = continuation
        self._prompt_lens.add(len(prompt))

    def prompt_len(self, history: Sequence[int]) -> int:
        for n in sorted(self._prompt_lens, reverse=True):
            if tuple(history[:n]) in self.scripts:
                return n
        return len(history)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return ids_of(text)

    def token_bytes(self, token_id: int) -> bytes:
        return PIECES[token_id]

    def new_batch(self, max_seqs: int, slot_capacity: int, pool_tokens: int | None = None) -> FakeBatch:
        capacity = min(slot_capacity, self.context_length)
        batch = FakeBatch(self, max_seqs, capacity, pool_tokens or capacity)
        self.batches.append(batch)
        return batch

    def new_lane(self, tokens: int) -> FakeBatch | None:
        if not self.lanes:
            return None
        lane = FakeBatch(self, 1, min(tokens, self.context_length), min(tokens, self.context_length))
        self.lane_batches.append(lane)
        return lane

    def close(self) -> None:
        self.closed = True
