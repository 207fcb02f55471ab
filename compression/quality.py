"""A profile's quality, measured against its base through the same engine interface that serves it.

Three measurements, all on data shipped in the repo and never used for calibration or distillation:
- perplexity on held-out prose (`data/heldout.txt`);
- teacher-forced comparison with the base on the same token windows: mean KL(base ‖ profile) over the
  next-token distributions and top-1 agreement, over all positions and over the hardest 10% (where the
  base's own distribution has the highest entropy: hard cases break first);
- a multiple-choice task set (`data/tasks.jsonl`) scored by loglikelihood ranking of each choice.
Plus single-stream decode speed, so one record holds everything the frontier report plots.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from shrinkserve.compression import data_file
from shrinkserve.compression.base_model import tool_version
from shrinkserve.compression.scoring import chunked_logprobs, hardest, kl_top1, log_softmax, prefill_last

Progress = Callable[[int], None]  # advances a progress bar by n units


@dataclass(frozen=True)
class EvalSet:
    text: str
    tasks: list[dict[str, Any]]
    max_tokens: int | None
    window: int

    @classmethod
    def load(cls, *, max_tokens: int | None = None, tasks: int | None = None, window: int = 512) -> EvalSet:
        lines = data_file("tasks.jsonl").read_text(encoding="utf-8").splitlines()
        items = [json.loads(line) for line in lines if line.strip()]
        return cls(data_file("heldout.txt").read_text(encoding="utf-8"), items[:tasks] if tasks is not None else items,
                   max_tokens, window)

    @property
    def sha256(self) -> str:
        """Identifies the data *and* how much of it is used: records from another eval set are stale."""
        h = hashlib.sha256(self.text.encode())
        h.update(json.dumps(self.tasks, sort_keys=True).encode())
        h.update(f"{self.max_tokens}/{self.window}".encode())
        return h.hexdigest()

    def token_ids(self, engine: Scorer) -> list[int]:
        ids = engine.tokenize(self.text, add_special=False)
        return ids[: self.max_tokens] if self.max_tokens is not None else ids

    def windows(self, ids: list[int]) -> list[list[int]]:
        return [w for w in (ids[i : i + self.window] for i in range(0, len(ids), self.window)) if len(w) >= 2]


class Scorer:
    """One engine plus one reusable sequence (a llama.cpp context is too costly to make per window)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.seq = engine.new_sequence()

    def close(self) -> None:
        self.seq.close()

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return self.engine.tokenize(text, add_special=add_special)

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """Log-softmax of the next-token distribution at positions 0..n-2 of a fresh sequence: [n-1, vocab].

        This is what every engine exposes for evaluation: per-position logprobs of a given continuation.
        """
        return chunked_logprobs(self.seq, ids, self.engine.max_batch)


def choice_logprobs(scorer: Scorer, context: str, choices: list[str]) -> list[float]:
    """Sum of the logprobs of each choice's tokens after `context` (lm-eval's loglikelihood).

    The context is read once; each choice then reuses its KV cache, so four choices cost about one prompt.
    """
    ctx = scorer.tokenize(context, add_special=True)
    wholes = [scorer.tokenize(context + c, add_special=True) for c in choices]
    # Where a choice's first token merged with the context's last, score from the first differing token.
    starts = [next((i for i, (a, b) in enumerate(zip(ctx, w, strict=False)) if a != b), len(ctx)) for w in wholes]
    shared = min(starts)
    if shared < 1:
        raise ValueError(f"context {context!r} shares no token with its continuations")
    seq = scorer.seq
    seq.truncate(0)
    after_shared = log_softmax(seq.forward(ctx[:shared], all_logits=False)[-1])
    scores = []
    for whole, start in zip(wholes, starts, strict=True):
        seq.truncate(shared)
        rest = whole[shared:]
        rows = [after_shared, *log_softmax(seq.forward(rest, all_logits=True))[:-1]] if rest else [after_shared]
        # rows[j] predicts whole[shared + j]; the choice is whole[start:]
        scores.append(float(sum(rows[pos - shared][whole[pos]] for pos in range(start, len(whole)))))
    return scores


def task_prompt(item: dict[str, Any]) -> tuple[str, list[str]]:
    return f"Question: {item['question']}\nAnswer:", [f" {c}" for c in item["choices"]]


def task_score(engine: Scorer, tasks: list[dict[str, Any]], progress: Progress | None = None) -> float:
    """Fraction of items whose correct choice has the highest loglikelihood."""
    correct = 0
    for item in tasks:
        context, choices = task_prompt(item)
        scores = choice_logprobs(engine, context, choices)
        correct += int(np.argmax(scores)) == item["answer"]
        if progress:
            progress(1)
    return correct / len(tasks) if tasks else float("nan")


def compare(reference: Scorer, engine: Scorer, evalset: EvalSet, progress: Progress | None = None) -> dict[str, float]:
    """Teacher-forced: both models read the same windows of held-out tokens (tokenized by the reference)."""
    ids = evalset.token_ids(reference)
    nll_ref = nll = 0.0
    kls, agrees, entropies = [], [], []
    for window in evalset.windows(ids):
        ref, lp = reference.logprobs(window), engine.logprobs(window)
        if ref.shape[1] != lp.shape[1]:  # padded vocabularies: compare the shared part
            n = min(ref.shape[1], lp.shape[1])
            ref, lp = ref[:, :n], lp[:, :n]
        rows, target = np.arange(len(window) - 1), np.asarray(window[1:])
        nll_ref -= float(ref[rows, target].sum())
        nll -= float(lp[rows, target].sum())
        kl, agree, entropy = kl_top1(ref, lp)
        kls.append(kl)
        agrees.append(agree)
        entropies.append(entropy)
        if progress:
            progress(len(window))
    kl_all, agree_all, ent_all = np.concatenate(kls), np.concatenate(agrees), np.concatenate(entropies)
    hard = hardest(ent_all)
    n = len(kl_all)
    return {
        "tokens": n,
        "reference_perplexity": math.exp(nll_ref / n),
        "perplexity": math.exp(nll / n),
        "kl": float(kl_all.mean()),
        "top1": float(agree_all.mean()),
        "kl_hard10": float(kl_all[hard].mean()),
        "top1_hard10": float(agree_all[hard].mean()),
    }


SPEED_PROMPT = "The history of the old city begins"


def greedy_decode(engine: Any, seq: Any, tokens: int) -> float:
    """Restart `seq` on SPEED_PROMPT and decode `tokens` greedy tokens; returns the decode seconds
    (prefill not counted). Shared by `decode_speed` and scripts/bench_decode.py."""
    logits = prefill_last(seq, engine.tokenize(SPEED_PROMPT, add_special=True), engine.max_batch)
    started = time.perf_counter()
    for _ in range(tokens):
        logits = seq.forward([int(np.argmax(logits))], all_logits=False)[0]
    return time.perf_counter() - started


def decode_speed(engine: Scorer, tokens: int = 32, rounds: int = 3) -> float:
    """Greedy single-stream decode tokens/s, best of `rounds`: on a shared 2-core box one round swings
    by ±20%, the best is what the profile can do."""
    return max(tokens / greedy_decode(engine.engine, engine.seq, tokens) for _ in range(rounds))


def evaluate(
    engine: Scorer, reference: Scorer, evalset: EvalSet, *, reference_task_score: float | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The full quality record of one profile (stored in its manifest, served in /v1/models)."""
    started = time.perf_counter()
    record: dict[str, Any] = compare(reference, engine, evalset, progress)
    record["ppl_ratio"] = record["perplexity"] / record["reference_perplexity"]
    record["task_score"] = task_score(engine, evalset.tasks, progress)
    record["reference_task_score"] = (reference_task_score if reference_task_score is not None
                                      else task_score(reference, evalset.tasks, progress))
    record["tasks"] = len(evalset.tasks)
    record["decode_tokens_per_s"] = decode_speed(engine)
    record["eval_set_sha256"] = evalset.sha256
    record["tools"] = {"shrinkserve": tool_version("shrinkserve"), "torch": tool_version("torch"),
                       "llama_cpp_python": tool_version("llama_cpp_python")}
    record["evaluated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record["eval_seconds"] = round(time.perf_counter() - started, 1)
    return record


def progress_units(evalset: EvalSet, tokens: int) -> int:
    """Total progress units of `evaluate`: held-out tokens, then one per task item (profile and reference)."""
    return tokens + 2 * len(evalset.tasks)


def iter_gate_failures(record: dict[str, Any], gate: Any) -> Iterator[str]:
    """Each limit of `gate` that `record` misses, as a sentence saying by how much."""
    checks = [
        ("max_ppl_increase", record["ppl_ratio"] - 1.0, "perplexity increase", False),
        ("max_kl", record["kl"], "mean KL divergence", False),
        ("max_kl_hard10", record["kl_hard10"], "KL divergence on the hardest 10%", False),
        ("min_top1_agreement", record["top1"], "top-1 agreement", True),
        ("min_top1_agreement_hard10", record["top1_hard10"], "top-1 agreement on the hardest 10%", True),
        ("min_task_score", record["task_score"], "task score", True),
    ]
    traffic = record.get("traffic")
    traffic_checks = [
        ("max_traffic_kl", "kl", "KL divergence on held-out traffic", False),
        ("max_traffic_kl_hard10", "kl_hard10", "KL divergence on the hardest 10% of held-out traffic", False),
        ("min_traffic_top1", "top1", "top-1 agreement on held-out traffic", True),
        ("min_traffic_top1_hard10", "top1_hard10", "top-1 agreement on the hardest 10% of held-out traffic", True),
    ]
    for field, key, what, is_min in traffic_checks:
        if getattr(gate, field, None) is None:
            continue
        if traffic is None:
            yield f"{what} was not measured ({field}): the record has no held-out traffic score"
            continue
        checks.append((field, traffic[key], what, is_min))
    for field, value, what, is_min in checks:
        limit = getattr(gate, field, None)
        if limit is None:
            continue
        if (value < limit) if is_min else (value > limit):
            yield (f"{what} {value:.4g} is {'below the minimum' if is_min else 'above the maximum'} {limit:g} "
                   f"({field}) by {abs(value - limit):.4g}")
