"""How a prompt is cut into forward chunks, and a prefill for single sequences (quality evaluation, tools).

Logits depend, in their last bits, on how tokens were batched. So a prompt is always cut the same
way — chunks of `chunk` tokens from position 0, the prompt's last token on its own — whoever runs it:
the serving core (runtime/batching.py) and the single-sequence prefill below. The same request with
the same seed then gives the same text whatever the slot served before.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence as Seq

import numpy as np

from shrinkserve.server.runtime.sampling import log_softmax


class Cancelled(Exception):
    pass


def chunk_ends(n: int, chunk: int) -> list[int]:
    """Where the chunks of an n-token prompt end: every `chunk` tokens, then n-1 and n."""
    ends = [*range(chunk, n - 1, chunk), n - 1, n] if n > 1 else [n]
    return sorted({e for e in ends if e > 0})


def prefill(
    engine: object,
    seq: object,
    ids: Seq[int],
    cancel: threading.Event | None = None,
    *,
    want_prompt_logprobs: bool = False,
    reuse_prefix: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Feed `ids` into a single `Sequence`; return (logits after the last id, logprobs for positions
    1..n-1 or None).

    Cached KV is reused only up to a chunk end that an earlier prefill cut identically, so a repeated
    prompt (or a shared system prompt cut at the same place) costs one decode step. Per-position
    logprobs need every position's logits, so they disable reuse.
    """
    n = len(ids)
    ends = chunk_ends(n, engine.max_batch)  # type: ignore[attr-defined]
    keep = 0
    if reuse_prefix and not want_prompt_logprobs:
        cached, common = seq.tokens, 0  # type: ignore[attr-defined]
        limit = min(len(cached), n - 1)
        while common < limit and cached[common] == ids[common]:
            common += 1
        reusable = set(seq.prefill_ends)  # type: ignore[attr-defined]
        keep = max((e for e in ends if e <= common and e in reusable), default=0)
    seq.truncate(keep)  # type: ignore[attr-defined]
    rows: list[np.ndarray] = []
    last: np.ndarray | None = None
    start = keep
    for end in ends:
        if end <= keep:
            continue
        if cancel is not None and cancel.is_set():
            raise Cancelled
        logits = seq.forward(ids[start:end], all_logits=want_prompt_logprobs)  # type: ignore[attr-defined]
        seq.prefill_ends.append(end)  # type: ignore[attr-defined]
        if want_prompt_logprobs:
            rows.append(log_softmax(logits))
        last = logits[-1]
        start = end
    assert last is not None
    prompt_lp = np.concatenate(rows)[:-1] if want_prompt_logprobs else None
    return last, prompt_lp
