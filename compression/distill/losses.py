"""Distillation losses, per response token (callers average over the tokens of an optimizer step).

- `forward_kl`: KL(teacher ‖ student) over the full vocabulary, when the teacher runs in-process.
- `topk_tail_kl`: the same KL over the coarser distribution a capture record can hold: the teacher's top-k
  tokens plus ONE tail bucket holding the remaining mass, 1 − Σ top-k, on both sides. The student's tail is
  the exact mass its full softmax puts outside those k ids. Renormalising the top-k (or dropping the tail)
  would be a different objective: it rewards a student that ignores how much mass the teacher left outside
  the top-k, and is unbounded where the teacher was unsure.
- `cross_entropy`: hard labels = the teacher's sampled tokens (behaviour cloning, the baseline).

All computed in float32 whatever the autocast dtype: sums over a 49k vocabulary lose too much in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shrinkserve.compression.distill.options import LossKind

# A tail mass below this is rounding noise of a float32 sum of k probabilities (the records hold float32
# logprobs), not mass: it counts as 0, else the term would pit noise against the student's own tail, which is
# exactly 0 when the recorded ids cover the whole vocabulary.
TAIL_EPS = 1e-6


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """[N, V], [N, V] → [N]: Σ_v p_v (log p_v − log q_v) with p the teacher's softmax, q the student's."""
    s = torch.log_softmax(student_logits.float(), dim=-1)
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(dim=-1)


def topk_tail_kl(
    student_logits: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor, valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N, V] student logits; [N, K] teacher ids and logprobs (full-distribution logprobs, best first);
    `valid` [N, K] marks real entries (rows of a batch may hold different k). Returns [N].

    KL = Σ_{i∈S} p_i (log p_i − log q_i) + p_T (log p_T − log q_T), with S the valid ids of the row,
    p_T = 1 − Σ_S p_i (0 below TAIL_EPS) and q_T = 1 − Σ_S q_i computed as logsumexp of the logits outside S minus
    the full logsumexp (exact, no cancellation in 1 − Σ).
    """
    logits = student_logits.float()
    t_lp = teacher_logprobs.float()
    if valid is None:
        valid = torch.ones_like(ids, dtype=torch.bool)
    if not bool(valid[:, 0].all()):
        raise ValueError("every row needs at least its first top-k entry")
    # Padded entries repeat the row's first id: every write of the scatter below then sets -inf at an id
    # that is in S anyway, so duplicates cannot race.
    ids = torch.where(valid, ids, ids[:, :1].expand_as(ids))
    lse = torch.logsumexp(logits, dim=-1)
    s_k = logits.gather(1, ids) - lse[:, None]
    outside = logits.scatter(1, ids, float("-inf"))
    s_tail = torch.logsumexp(outside, dim=-1) - lse
    p = torch.where(valid, t_lp.exp(), torch.zeros_like(t_lp))
    known = torch.where(p > 0, p * (t_lp - s_k), torch.zeros_like(p)).sum(dim=-1)
    p_tail = 1.0 - p.sum(dim=-1)
    # p_T log p_T − p_T log q_T; where p_T ≈ 0 the term is 0 (and q_T is exactly 0 when the ids cover V).
    has_tail = (p_tail > TAIL_EPS) & torch.isfinite(s_tail)
    safe_tail = torch.where(has_tail, p_tail, torch.ones_like(p_tail))
    tail = torch.where(has_tail, safe_tail * (safe_tail.log() - torch.where(has_tail, s_tail, 0.0)),
                       torch.zeros_like(p_tail))
    return known + tail


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, V], [N] → [N]: −log q(target)."""
    return F.cross_entropy(student_logits.float(), targets, reduction="none")


def token_losses(
    kind: LossKind,
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    mix: float = 0.0,
    teacher_logits: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    topk_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token loss of one kind: (1 − mix)·KL + mix·CE for `kd`/`topk`; plain CE for `ce`."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError("mix must be in [0, 1]")
    if kind == "ce":
        return cross_entropy(student_logits, targets)
    if kind == "kd":
        if teacher_logits is None:
            raise ValueError("loss 'kd' needs the teacher's logits")
        kl = forward_kl(student_logits, teacher_logits)
    elif kind == "topk":
        if topk_ids is None or topk_logprobs is None:
            raise ValueError("loss 'topk' needs the records' top-k ids and logprobs")
        kl = topk_tail_kl(student_logits, topk_ids, topk_logprobs, topk_valid)
    else:
        raise ValueError(f"unknown loss kind {kind!r}")
    if mix == 0.0:
        return kl
    return (1.0 - mix) * kl + mix * cross_entropy(student_logits, targets)
