"""Quality of a profile, measured through the same engine interface that serves it."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np


def heldout_file() -> Path:
    return Path(str(resources.files("shrinkserve.compression").joinpath("data/heldout.txt")))


def perplexity(engine: object, text: str, *, window: int = 512, max_tokens: int | None = None) -> dict[str, float]:
    """Perplexity of `text` in non-overlapping windows of `window` tokens (each window starts fresh).

    `engine` is a shrinkserve engine (llama.cpp or torch): both score through the same code path.
    """
    from shrinkserve.server.generation import prefill

    ids = engine.tokenize(text, add_special=False)  # type: ignore[attr-defined]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    seq = engine.new_sequence()  # type: ignore[attr-defined]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        seq.reset()
        _, lp = prefill(engine, seq, chunk, want_prompt_logprobs=True, reuse_prefix=False)  # type: ignore[arg-type]
        assert lp is not None
        picked = lp[np.arange(len(chunk) - 1), np.asarray(chunk[1:])]
        nll -= float(picked.sum())
        count += len(chunk) - 1
    return {"perplexity": math.exp(nll / count), "tokens": float(count)}
