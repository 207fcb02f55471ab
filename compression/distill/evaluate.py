"""A student measured against its teacher on its own task: held-out traffic it was never trained on.

Same definitions as compression/quality.py's prose comparison, restricted to response tokens: per position
KL(teacher ‖ candidate) over the next-token distributions, top-1 agreement, and both over the hardest 10%
of positions (highest teacher entropy: hard cases break first). Works on any engine with the single-sequence
API (`new_sequence()` → `seq.forward(ids, all_logits=True)` / `seq.truncate(n)`, and `max_batch`), so a
PyTorch profile, a llama.cpp GGUF and an in-memory model are scored alike. Several candidates are scored in
one pass so the teacher reads each example once.

Without a teacher engine the records' own top-k + tail distribution stands in for the teacher (KL over
top-k + one tail bucket; top-1 = the recorded best token; hardness from the entropy of that coarse
distribution); the result says which.

Scoring goes through compression/scoring.py (the same prompt cut, log-softmax and KL/top-1/hardest as the
prose comparison and the serving core).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from shrinkserve.compression.distill.data import DistillExample, examples_digest
from shrinkserve.compression.scoring import LogitsEngine, chunked_logprobs, hardest, kl_top1


def records_kl_top1(
    ex: DistillExample, lp: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like kl_top1, with the record's top-k + tail bucket as the teacher (float64)."""
    assert ex.topk_ids is not None and ex.topk_logprobs is not None
    ids, t_lp = ex.topk_ids, ex.topk_logprobs.astype(np.float64)
    p = np.exp(t_lp)
    p_tail = np.clip(1.0 - p.sum(axis=1), 0.0, None)
    q_k = np.take_along_axis(lp, ids, axis=1)
    q_tail = np.clip(1.0 - np.exp(q_k).sum(axis=1), 1e-300, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        known = np.where(p > 0, p * (t_lp - q_k), 0.0).sum(axis=1)
        tail = np.where(p_tail > 0, p_tail * (np.log(np.where(p_tail > 0, p_tail, 1.0)) - np.log(q_tail)), 0.0)
        entropy = -np.where(p > 0, p * t_lp, 0.0).sum(axis=1) - np.where(
            p_tail > 0, p_tail * np.log(np.where(p_tail > 0, p_tail, 1.0)), 0.0)
    agree = lp.argmax(axis=1) == ids[:, 0]
    return np.maximum(known + tail, 0.0), agree, entropy


def _summary(kls: list[np.ndarray], agrees: list[np.ndarray], entropies: list[np.ndarray]) -> dict[str, float]:
    kl, agree, ent = np.concatenate(kls), np.concatenate(agrees), np.concatenate(entropies)
    hard = hardest(ent)
    return {"tokens": len(kl), "kl": float(kl.mean()), "top1": float(agree.mean()),
            "kl_hard10": float(kl[hard].mean()), "top1_hard10": float(agree[hard].mean())}


def score_candidates(
    candidates: Mapping[str, LogitsEngine],
    examples: Sequence[DistillExample],
    *,
    teacher: LogitsEngine | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per candidate name: {examples, tokens, kl, top1, kl_hard10, top1_hard10, teacher, data_sha256}, over
    the response tokens of `examples` (teacher-forced: every model reads the example's own tokens)."""
    if not examples:
        raise ValueError("no held-out examples to score on")
    if teacher is None and not all(ex.has_topk for ex in examples):
        raise ValueError("without a teacher engine every example needs its recorded top-k")
    seqs = {name: eng.new_sequence() for name, eng in candidates.items()}
    t_seq = teacher.new_sequence() if teacher is not None else None
    acc: dict[str, tuple[list, list, list]] = {name: ([], [], []) for name in candidates}
    try:
        for ex in examples:
            r = ex.response_start
            ref = None
            if teacher is not None:
                assert t_seq is not None
                ref = chunked_logprobs(t_seq, ex.ids, teacher.max_batch)[r - 1:]
            for name, eng in candidates.items():
                lp = chunked_logprobs(seqs[name], ex.ids, eng.max_batch)[r - 1:]
                if ref is not None:
                    n = min(ref.shape[1], lp.shape[1])  # padded vocabularies: compare the shared part
                    kl, agree, ent = kl_top1(ref[:, :n], lp[:, :n])
                else:
                    kl, agree, ent = records_kl_top1(ex, lp)
                for store, value in zip(acc[name], (kl, agree, ent), strict=True):
                    store.append(value)
            if progress is not None:
                progress(ex.n_response)
    finally:
        for seq in [*seqs.values(), t_seq]:
            close = getattr(seq, "close", None)
            if close is not None:
                close()
    digest = examples_digest(examples)
    return {name: {"examples": len(examples), **_summary(*acc[name]),
                   "teacher": "engine" if teacher is not None else "records", "data_sha256": digest}
            for name in candidates}


def score_on_traffic(
    engine: LogitsEngine, examples: Sequence[DistillExample], *, teacher: LogitsEngine | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """One profile's score on held-out traffic: the plain dict the quality record carries as `traffic`."""
    return score_candidates({"profile": engine}, examples, teacher=teacher, progress=progress)["profile"]


def prose_examples(token_ids: Sequence[int], window: int = 512) -> list[DistillExample]:
    """Held-out prose as examples scored at every position after the first (quality.py's windows), so prose
    and traffic go through the same scorer."""
    out = []
    for i in range(0, len(token_ids), window):
        w = np.asarray(token_ids[i:i + window], dtype=np.int64)
        if len(w) >= 2:
            out.append(DistillExample(w, 1))
    return out


class TorchLogits:
    """The single-sequence API over an in-memory HF causal LM (no KV cache: each forward re-reads the
    sequence so far; fine for scoring, where every sequence is fed once in a few chunks)."""

    def __init__(self, model: Any, *, max_batch: int = 512) -> None:
        self.model = model
        self.max_batch = max_batch

    def new_sequence(self) -> _TorchSeq:
        return _TorchSeq(self)


class _TorchSeq:
    def __init__(self, owner: TorchLogits) -> None:
        self.owner = owner
        self.tokens: list[int] = []

    def truncate(self, n: int) -> None:
        del self.tokens[n:]

    def forward(self, ids: Sequence[int], *, all_logits: bool) -> np.ndarray:
        import torch

        start = len(self.tokens)
        self.tokens.extend(int(t) for t in ids)
        model = self.owner.model
        device = next(model.parameters()).device
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([self.tokens], device=device), use_cache=False).logits[0, start:]
        out = out.float().cpu().numpy()
        return out if all_logits else out[-1:]

