"""Automatic prefix caching: which earlier KV a new sequence may reuse, and where reuse must stop.

A new sequence looks at every slot that holds KV (running sequences and idle entries left by finished
ones) and takes the longest common token prefix. Two limits apply:

- at least the last token of what it prefills is computed, because its logits start the decode;
- a request that must reproduce its text bit for bit (seeded, on a profile whose kernels are not
  batch-invariant) reuses only KV that a fresh prefill of its own would have produced bit for bit: whole
  prefill chunks from position 0 (the fixed boundaries of compression/scoring.chunk_ends), each computed in
  a forward of its own. Each slot tracks how far its KV is such canonical KV (`exact`).

On a profile whose rows do not depend on the batch, and whose KV does not depend on how it was computed
(probed at load: `probe_prefix_reuse`), any boundary is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from shrinkserve.server.engines.base import BatchModel, Slot, Work


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


@dataclass(frozen=True)
class Match:
    slot: Slot
    tokens: int  # positions of `slot` the new sequence takes


def reusable(tokens: Sequence[int], held: Sequence[int], exact: int, *, strict: bool, chunk: int) -> int:
    """Positions of KV holding `held` (the first `exact` of them canonical) a sequence feeding `tokens` may
    reuse: never its last token; under `strict`, only whole canonical chunks."""
    n = min(common_prefix(tokens, held), len(tokens) - 1)
    if strict:
        n = min(n, exact) // chunk * chunk
    return max(0, n)


def best_match(tokens: Sequence[int], candidates: Iterable[tuple[Slot, int]], *, strict: bool,
               chunk: int) -> Match | None:
    """The candidate (slot, exact) giving the longest reuse; None when nothing is reusable."""
    best: Match | None = None
    for slot, exact in candidates:
        n = reusable(tokens, slot.tokens, exact, strict=strict, chunk=chunk)
        if n > 0 and (best is None or n > best.tokens):
            best = Match(slot, n)
    return best


def probe_prefix_reuse(model: BatchModel, tokens: list[int], decode: int = 4) -> bool:
    """Does a sequence decode the same rows, bit for bit, after a fresh prefill and after taking half of its
    prompt from another slot that computed it differently (a short chunk, then one token per step beside
    another sequence)? Needs 3 free slots; leaves every slot free. Like the batch-invariance probe it can
    only find a difference, never prove there is none."""
    tokens = tokens[: min(len(tokens), model.max_chunk, 24)]
    if model.max_seqs < 3 or len(tokens) < 6:
        return False
    half = len(tokens) // 2
    feed = [tokens[i % len(tokens)] for i in range(decode)]

    def decode_rows(me: Slot, first: list[int]) -> list[np.ndarray]:
        rows = [model.step([Work(me, first)])[0][-1]]
        for t in feed:
            rows.append(model.step([Work(me, [t])])[0][-1])
        return rows

    me = model.acquire()
    try:
        fresh = decode_rows(me, tokens)
    finally:
        model.release(me)
    src, other, me = model.acquire(), model.acquire(), model.acquire()
    try:
        model.step([Work(src, tokens[:2]), Work(other, tokens[:3])])
        for t in tokens[2:half]:
            model.step([Work(src, [t]), Work(other, [t])])
        model.share(src, me, half)
        reused = decode_rows(me, tokens[half:])
    finally:
        for s in (src, other, me):
            model.release(s)
    return all(np.array_equal(a, b) for a, b in zip(fresh, reused, strict=True))
