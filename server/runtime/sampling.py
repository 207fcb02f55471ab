"""Sampling and logprobs from raw next-token logits, the same for every in-process engine."""

from __future__ import annotations

import numpy as np

from shrinkserve.compression.scoring import log_softmax, top_k
from shrinkserve.server.runtime.logits_processors import filter_scaled_logits
from shrinkserve.server.runtime.types import SamplingParams

__all__ = ["Sampler", "log_softmax", "top_k"]

# top_p usually keeps a few dozen tokens; sorting only this many candidates instead of the whole
# vocabulary keeps per-token sampling cost well under a millisecond.
_TOP_P_CANDIDATES = 512


class Sampler:
    """Temperature → min-p → top-k → top-p sampling with a per-request RNG: the same seed gives the same
    tokens. Greedy (temperature 0) is the argmax: min-p and top-k cannot change it (vLLM skips them too)."""

    def __init__(self, params: SamplingParams) -> None:
        self.temperature = params.temperature
        self.top_p = params.top_p
        self.top_k = params.top_k
        self.min_p = params.min_p
        seed = None if params.seed is None else params.seed % 2**64
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits_row: np.ndarray) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits_row))
        z = logits_row.astype(np.float64) / self.temperature
        if self.top_k or self.min_p:
            filter_scaled_logits(z, top_k=self.top_k, min_p=self.min_p)
        p = np.exp(z - z.max())
        total = p.sum()
        if self.top_p < 1.0:
            return self._nucleus(p, total)
        cdf = np.cumsum(p)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), len(p) - 1))

    def _nucleus(self, p: np.ndarray, total: float) -> int:
        k = min(_TOP_P_CANDIDATES, len(p))
        cand = np.argpartition(-p, k - 1)[:k]
        cand = cand[np.argsort(-p[cand], kind="stable")]
        mass = np.cumsum(p[cand]) / total
        if mass[-1] < self.top_p and k < len(p):  # a very flat distribution: sort everything
            cand = np.argsort(-p, kind="stable")
            mass = np.cumsum(p[cand]) / total
        keep = int(np.searchsorted(mass, self.top_p, side="left")) + 1
        cdf = mass[:keep]
        pick = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(cand[min(pick, keep - 1)])
