"""Scoring primitives shared by quality evaluation, traffic capture and distillation.

Everything here works on one structural protocol, the single-sequence API every in-process engine
offers (`engine.new_sequence()` → `seq.forward(ids, all_logits=...)` / `seq.truncate(n)`, plus
`engine.max_batch`), so compression never imports the server that implements it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class LogitsSequence(Protocol):
    """One KV cache: appends ids and returns next-token logits ([len(ids) or 1, vocab], float32)."""

    def forward(self, ids: Sequence[int], *, all_logits: bool) -> np.ndarray: ...

    def truncate(self, n: int) -> None: ...


class LogitsEngine(Protocol):
    max_batch: int  # most tokens one forward() takes

    def new_sequence(self) -> LogitsSequence: ...

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]: ...


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (sums over a 49k vocabulary lose digits in float32)."""
    z = logits.astype(np.float64, copy=False)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def top_k(logprobs_row: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens as (id, logprob), most likely first (ties: lower id first)."""
    if k <= 0:
        return []
    k = min(k, logprobs_row.shape[-1])
    idx = np.argpartition(-logprobs_row, k - 1)[:k]
    idx = idx[np.lexsort((idx, -logprobs_row[idx]))]
    return [(int(i), float(logprobs_row[i])) for i in idx]


def chunk_ends(n: int, max_batch: int) -> list[int]:
    """Where a prompt of n tokens is cut: chunks of `max_batch` tokens from position 0, then n.

    Logits depend in their last bits on how tokens were batched, so scoring cuts a sequence exactly the
    way the serving core prefills a prompt (server/runtime/batching.py uses this function): a profile
    scored here and the same profile answering an echo request then give the same numbers.
    """
    return [*range(max_batch, n, max_batch), n] if n > 0 else []


def _feed(seq: LogitsSequence, ids: Sequence[int], max_batch: int, *, all_logits: bool) -> list[np.ndarray]:
    seq.truncate(0)
    out, start = [], 0
    for end in chunk_ends(len(ids), max_batch):
        out.append(seq.forward(ids[start:end], all_logits=all_logits))
        start = end
    return out


def chunked_logprobs(seq: LogitsSequence, ids: Sequence[int], max_batch: int) -> np.ndarray:
    """Log-softmax of the next-token distribution at positions 0..n-2 of a fresh sequence: [n-1, vocab]."""
    if len(ids) < 2:
        raise ValueError("scoring needs at least two tokens")
    rows = [log_softmax(logits) for logits in _feed(seq, ids, max_batch, all_logits=True)]
    return np.concatenate(rows)[:-1]


def prefill_last(seq: LogitsSequence, ids: Sequence[int], max_batch: int) -> np.ndarray:
    """Restart `seq` on `ids` (cut as chunk_ends says) and return the logits after the last id: [vocab]."""
    if not ids:
        raise ValueError("prefill needs at least one token")
    return _feed(seq, ids, max_batch, all_logits=False)[-1][-1]


def kl_top1(ref: np.ndarray, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position of two [n, vocab] logprob arrays: KL(ref ‖ lp), whether the argmaxes agree, the
    reference's entropy (the "hardest 10%" are the positions where the reference is least sure)."""
    p = np.exp(ref)
    kl = (p * (ref - lp)).sum(axis=1)
    entropy = -(p * ref).sum(axis=1)
    agree = ref.argmax(axis=1) == lp.argmax(axis=1)
    return np.maximum(kl, 0.0), agree, entropy


def hardest(entropy: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Indices of the `fraction` of positions with the highest reference entropy (at least one)."""
    return np.argsort(-entropy, kind="stable")[: max(1, int(len(entropy) * fraction + 1e-9))]
