"""The distillation loop: our own, on plain torch (Trainer/TRL pin transformers/torch versions that clash
with ours, and we need exact resume semantics anyway).

- Loss on response tokens only; the student's output head runs only at those positions (on a 49k vocabulary
  the head is a large share of the cost, and prompt positions carry no loss).
- AdamW, linear warm-up then constant LR, gradient accumulation, gradient clipping. Every optimizer step is
  the token-weighted mean over all its micro-batches, so `batch × accum` behaves like one big batch.
- Budgets: loss tokens, wall-clock seconds (summed over resumes), optimizer steps — the first reached stops.
- Deterministic for a seed: the example order is a pure function of (seed, epoch); nothing else is random
  (Llama has no dropout). A resumed run therefore reproduces the uninterrupted loss curve.
- Checkpoints (model, optimizer, torch RNG, data cursor, history) every N steps through CheckpointStore;
  `train()` resumes from the newest one in `run_dir` by itself.
- Held-out evaluation every N steps; early stop after `patience` evaluations without improvement, and the
  best evaluated weights are what the run returns.
- `device="auto"` uses CUDA when present (bf16 autocast, fp32 master weights), else CPU in float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shrinkserve.compression.distill.checkpoint import CheckpointStore, write_file_atomic
from shrinkserve.compression.distill.data import DistillExample, examples_digest
from shrinkserve.compression.distill.losses import LossKind, forward_kl, token_losses, topk_tail_kl

log = logging.getLogger("shrinkserve.distill.train")

Device = Literal["auto", "cpu", "cuda"]


class TrainConfig(BaseModel):
    """Everything that changes what training computes (it is part of the student's cache key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    loss: LossKind = "kd"
    top_k: int | None = Field(default=None, ge=1, description="topk loss: use at most this many recorded entries")
    include_sampled: bool = Field(
        default=False, description="topk loss: the sampled token as one more known category when outside the top-k")
    mix: float = Field(default=0.0, ge=0.0, le=1.0, description="(1 − mix)·KL + mix·CE on the teacher's tokens")
    lr: float = Field(default=2e-4, gt=0)
    batch: int = Field(default=8, ge=1, description="sequences per micro-batch")
    accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    max_len: int = Field(default=512, ge=2, description="tokens per sequence (prompt kept whole, response cut)")
    freeze_embeddings: bool = Field(default=False, description="train everything but the (tied) embedding")
    tokens: int | None = Field(default=None, ge=1, description="budget: loss (response) tokens")
    seconds: float | None = Field(default=None, gt=0, description="budget: training wall-clock seconds")
    steps: int | None = Field(default=None, ge=1, description="budget: optimizer steps")
    eval_every: int = Field(default=50, ge=1)
    eval_examples: int = Field(default=32, ge=1)
    patience: int = Field(default=3, ge=0, description="evaluations without improvement before stopping; 0 = never")
    min_delta: float = Field(default=0.0, ge=0)
    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _bounded(self) -> TrainConfig:
        if self.tokens is None and self.seconds is None and self.steps is None:
            raise ValueError("give a budget: tokens, seconds or steps")
        return self

    def fingerprint(self) -> str:
        """What a checkpoint must have been made under to be resumed (the wall-clock budget may change)."""
        d = self.model_dump(exclude={"seconds", "tokens", "steps", "checkpoint_every", "keep_checkpoints"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    steps: int
    tokens: int  # loss (response) tokens trained on
    sequence_tokens: int  # all tokens run through the student
    seconds: float
    stop_reason: str  # tokens | seconds | steps | early_stop
    device: str
    eval_metric: str  # kl | topk_kl | ce
    history: list[dict[str, float]] = field(default_factory=list)  # per optimizer step
    evals: list[dict[str, float]] = field(default_factory=list)  # per held-out evaluation
    best_step: int | None = None
    best_eval: float | None = None
    resumed_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: Device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


# -- batches ------------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [N] batch row of each loss position
    cols: torch.Tensor  # [N] position whose logits predict a response token
    targets: torch.Tensor  # [N] the response token (the teacher's sampled token)
    topk_ids: torch.Tensor | None = None  # [N, K]
    topk_logprobs: torch.Tensor | None = None
    topk_valid: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device) -> Batch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        return Batch(*(mv(getattr(self, f)) for f in self.__dataclass_fields__))  # type: ignore[arg-type]


def _topk_rows(ex: DistillExample, top_k: int | None, include_sampled: bool) -> tuple[np.ndarray, np.ndarray]:
    assert ex.topk_ids is not None and ex.topk_logprobs is not None
    ids, lps = ex.topk_ids[:, :top_k], ex.topk_logprobs[:, :top_k]
    if not include_sampled or ex.sampled_logprobs is None:
        return ids, lps
    sampled = ex.ids[ex.response_start:]
    outside = ~(ids == sampled[:, None]).any(axis=1)
    # One extra column: the sampled token where it is outside the top-k (its exact logprob is known),
    # else a padding entry (logprob -inf = probability 0, masked as invalid by collate).
    extra_ids = np.where(outside, sampled, ids[:, 0])
    extra_lp = np.where(outside, ex.sampled_logprobs, -np.inf).astype(np.float32)
    return np.concatenate([ids, extra_ids[:, None]], axis=1), np.concatenate([lps, extra_lp[:, None]], axis=1)


def collate(
    examples: Sequence[DistillExample], *, pad_id: int = 0, want_topk: bool = False, top_k: int | None = None,
    include_sampled: bool = False,
) -> Batch:
    """Right-padded ids + mask, and the (row, position) of every response token's prediction."""
    t_max = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), t_max), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), t_max), dtype=torch.long)
    rows, cols, targets, k_ids, k_lps = [], [], [], [], []
    for b, ex in enumerate(examples):
        n, r = len(ex.ids), ex.response_start
        ids[b, :n] = torch.from_numpy(np.asarray(ex.ids, dtype=np.int64))
        mask[b, :n] = 1
        rows.append(np.full(n - r, b))
        cols.append(np.arange(r - 1, n - 1))  # logits at t predict token t + 1
        targets.append(np.asarray(ex.ids[r:], dtype=np.int64))
        if want_topk:
            if not ex.has_topk:
                raise ValueError("loss 'topk' needs top-k records for every training example")
            i, lp = _topk_rows(ex, top_k, include_sampled)
            k_ids.append(i)
            k_lps.append(lp)
    batch = Batch(ids, mask, torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols)),
                  torch.from_numpy(np.concatenate(targets)))
    if want_topk:
        k = max(a.shape[1] for a in k_ids)
        n_tok = batch.n_tokens
        out_ids = np.zeros((n_tok, k), dtype=np.int64)
        out_lp = np.full((n_tok, k), -np.inf, dtype=np.float32)
        row = 0
        for i, lp in zip(k_ids, k_lps, strict=True):
            out_ids[row:row + len(i), : i.shape[1]] = i
            out_ids[row:row + len(i), i.shape[1]:] = i[:, :1]
            out_lp[row:row + len(i), : i.shape[1]] = lp
            row += len(i)
        valid = np.isfinite(out_lp)
        valid[:, 0] = True
        batch.topk_ids, batch.topk_logprobs = torch.from_numpy(out_ids), torch.from_numpy(out_lp)
        batch.topk_valid = torch.from_numpy(valid)
    return batch


class DataCursor:
    """Endless, deterministic stream of examples: epoch e visits them in permutation(seed, e)."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        if n == 0:
            raise ValueError("no training examples")
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            out.append(int(self._perm[self.index]))
            self.index += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


# -- model plumbing -------------------------------------------------------------------------------------


def response_logits(model: Any, batch: Batch) -> torch.Tensor:
    """The model's logits at the batch's loss positions only: [N, V], float32.

    The output head runs in float32 even under bf16 autocast: KD compares whole distributions, and bf16
    logits (8 significant bits) blur exactly the small probabilities the teacher's tail is made of.
    """
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    h = hidden.last_hidden_state[batch.rows, batch.cols]
    head = model.lm_head
    with torch.autocast(device_type=h.device.type, enabled=False):
        bias = None if head.bias is None else head.bias.float()
        return torch.nn.functional.linear(h.float(), head.weight.float(), bias)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def eval_metric_name(cfg: TrainConfig, has_teacher: bool, heldout: Sequence[DistillExample]) -> str:
    if has_teacher:
        return "kl"
    if heldout and all(ex.has_topk for ex in heldout):
        return "topk_kl"
    return "ce"


@torch.no_grad()
def heldout_loss(
    student: Any, examples: Sequence[DistillExample], metric: str, *, teacher: Any | None = None,
    batch_size: int = 8, device: torch.device | None = None, pad_id: int = 0,
) -> float:
    """Mean per-response-token KL(teacher ‖ student) (full vocab with a teacher, top-k + tail from records)
    or CE, over `examples`."""
    device = device or next(student.parameters()).device
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], pad_id=pad_id, want_topk=metric == "topk_kl").to(device)
            with _autocast(device):
                s = response_logits(student, batch)
                if metric == "kl":
                    assert teacher is not None
                    per = forward_kl(s, response_logits(teacher, batch))
                elif metric == "topk_kl":
                    assert batch.topk_ids is not None and batch.topk_logprobs is not None
                    per = topk_tail_kl(s, batch.topk_ids, batch.topk_logprobs, batch.topk_valid)
                else:
                    per = torch.nn.functional.cross_entropy(s.float(), batch.targets, reduction="none")
            total += float(per.double().sum())
            count += per.numel()
    finally:
        student.train(was_training)
    return total / max(count, 1)


# -- the loop -------------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


def _trainable(student: Any, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    if cfg.freeze_embeddings:
        emb = student.get_input_embeddings().weight
        emb.requires_grad_(False)
        out_emb = student.get_output_embeddings()
        if out_emb is not None:
            out_emb.weight.requires_grad_(False)
    return [p for p in student.parameters() if p.requires_grad]


def _best_name(step: int) -> str:
    return f"best-{step:08d}.pt"


def _save_best(run_dir: Path | None, step: int, student: Any, memory: dict[str, Any]) -> None:
    """The weights of the best held-out evaluation so far: in memory, or beside the checkpoints (named by
    step, because a checkpoint taken before this one may be resumed and must find *its* best)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
    if run_dir is None:
        memory[step] = state
        for old in [s for s in memory if s != step]:
            del memory[old]
        return

    def write(f: Any) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        f.write(buf.getbuffer())
    write_file_atomic(run_dir / _best_name(step), write)


def _load_best(run_dir: Path | None, step: int, memory: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    if run_dir is None:
        return memory.get(step)
    path = run_dir / _best_name(step)
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def _drop_unreferenced_best(run_dir: Path, store: CheckpointStore, current: int | None) -> None:
    keep = {current}
    for s in store.steps():
        try:
            keep.add(json.loads((run_dir / f"step-{s:08d}" / "state.json").read_text())["best_step"])
        except (OSError, ValueError, KeyError):
            continue
    for path in run_dir.glob("best-*.pt"):
        if path.name not in {_best_name(s) for s in keep if s is not None}:
            path.unlink(missing_ok=True)


def train(
    student: Any,
    train_examples: Sequence[DistillExample],
    heldout: Sequence[DistillExample],
    cfg: TrainConfig,
    *,
    teacher: Any | None = None,
    run_dir: Path | None = None,
    device: Device = "auto",
    pad_id: int = 0,
    progress: bool = True,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `student` (an HF causal LM, modified in place) and return what happened.

    `teacher` (an HF causal LM with the same vocabulary) is needed for loss 'kd' and gives the held-out KL
    its full-vocabulary form. With `run_dir`, checkpoints go there and an earlier run's newest checkpoint is
    resumed (it must have been made under the same TrainConfig; budgets may differ).
    """
    from tqdm.auto import tqdm

    dev = resolve_device(device)
    if cfg.loss == "kd" and teacher is None:
        raise ValueError("loss 'kd' needs the teacher in-process")
    train_examples = [ex.truncated(cfg.max_len) for ex in train_examples]
    heldout = [ex.truncated(cfg.max_len) for ex in heldout][: cfg.eval_examples]
    want_topk = cfg.loss == "topk"
    metric = eval_metric_name(cfg, teacher is not None, heldout)
    torch.manual_seed(cfg.seed)

    student.to(dev)
    student.train()
    if teacher is not None:
        teacher.to(dev)
        if dev.type == "cuda":  # the teacher only runs forward: bf16 halves its memory and time
            teacher.to(torch.bfloat16)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    params = _trainable(student, cfg)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    cursor = DataCursor(len(train_examples), cfg.seed)
    store = CheckpointStore(run_dir, keep=cfg.keep_checkpoints) if run_dir is not None else None
    best_memory: dict[str, Any] = {}

    step, tokens, seq_tokens, seconds = 0, 0, 0, 0.0
    history: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    best_step: int | None = None
    best_eval: float | None = None
    since_best = 0
    resumed_from = None
    stopped: str | None = None
    data_sha256 = examples_digest(train_examples)
    ckpt = store.latest() if store is not None else None
    if ckpt is not None:
        if ckpt.state.get("fingerprint") != cfg.fingerprint() or ckpt.state.get("data_sha256") != data_sha256:
            raise ValueError(f"{run_dir} holds a checkpoint of another training configuration or data; remove it "
                             "or use another run directory")
        student.load_state_dict(ckpt.model_state(dev))
        optimizer.load_state_dict(ckpt.optimizer_state(dev))
        s = ckpt.state
        step, tokens, seq_tokens, seconds = s["step"], s["tokens"], s["sequence_tokens"], s["seconds"]
        history, evals = s["history"], s["evals"]
        best_step, best_eval, since_best = s["best_step"], s["best_eval"], s["since_best"]
        cursor = DataCursor(len(train_examples), cfg.seed, s["cursor"]["epoch"], s["cursor"]["index"])
        _set_rng_state(s["rng"], dev)
        stopped = s.get("stopped")  # an early stop is final, whatever budget is left
        resumed_from = step
        log.info("resuming distillation from step %d (%d tokens, %.0f s)", step, tokens, seconds)

    def evaluate_now() -> bool:
        """Held-out evaluation at the current step; True when training should stop early."""
        nonlocal best_step, best_eval, since_best
        value = heldout_loss(student, heldout, metric, teacher=teacher, device=dev, pad_id=pad_id)
        evals.append({"step": step, "tokens": tokens, metric: value})
        if best_eval is None or value < best_eval - cfg.min_delta:
            best_step, best_eval, since_best = step, value, 0
            _save_best(run_dir, step, student, best_memory)
        else:
            since_best += 1
        return cfg.patience > 0 and since_best >= cfg.patience

    def save_checkpoint() -> None:
        if store is None:
            return
        store.save(step, student.state_dict(), optimizer.state_dict(), {
            "fingerprint": cfg.fingerprint(), "tokens": tokens, "sequence_tokens": seq_tokens, "seconds": seconds,
            "history": history, "evals": evals, "best_step": best_step, "best_eval": best_eval,
            "since_best": since_best, "cursor": cursor.state(), "rng": _rng_state(dev),
            "data_sha256": data_sha256, "stopped": "early_stop" if stop == "early_stop" else None,
        })
        assert run_dir is not None
        _drop_unreferenced_best(run_dir, store, best_step)

    def budget_reached() -> str | None:
        if cfg.tokens is not None and tokens >= cfg.tokens:
            return "tokens"
        if cfg.steps is not None and step >= cfg.steps:
            return "steps"
        if cfg.seconds is not None and seconds >= cfg.seconds:
            return "seconds"
        return None

    stop: str | None = stopped or budget_reached()
    if heldout and not evals:  # the initial (pruned) student's held-out score: the baseline to beat
        evaluate_now()
    by_tokens = cfg.tokens is not None
    bar = tqdm(total=cfg.tokens if by_tokens else cfg.steps, initial=tokens if by_tokens else step,
               unit="tok" if by_tokens else "step", desc=f"distill ({cfg.loss})", disable=not progress,
               dynamic_ncols=True)
    try:
        while stop is None:
            started = time.perf_counter()
            micro = [[train_examples[i] for i in cursor.take(cfg.batch)] for _ in range(cfg.accum)]
            batches = [collate(m, pad_id=pad_id, want_topk=want_topk, top_k=cfg.top_k,
                               include_sampled=cfg.include_sampled) for m in micro]
            step_tokens = sum(b.n_tokens for b in batches)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, cfg)
            loss_sum = 0.0
            for b in batches:
                b = b.to(dev)
                with _autocast(dev):
                    s_logits = response_logits(student, b)
                    t_logits = None
                    if cfg.loss == "kd":
                        assert teacher is not None
                        with torch.no_grad():
                            t_logits = response_logits(teacher, b)
                    per = token_losses(cfg.loss, s_logits, b.targets, mix=cfg.mix, teacher_logits=t_logits,
                                       topk_ids=b.topk_ids, topk_logprobs=b.topk_logprobs, topk_valid=b.topk_valid)
                loss = per.sum() / step_tokens
                loss.backward()
                loss_sum += float(per.detach().double().sum())
                seq_tokens += int(b.attention_mask.sum())
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            elapsed = time.perf_counter() - started
            row = {"step": step, "loss": loss_sum / step_tokens, "tokens": tokens, "lr": _lr_at(step - 1, cfg)}
            history.append(row)
            if on_step is not None:
                on_step(row)
            early = evaluate_now() if heldout and step % cfg.eval_every == 0 else False
            seconds += time.perf_counter() - started  # the wall-clock budget includes evaluation time
            stop = "early_stop" if early else budget_reached()
            if stop is not None or step % cfg.checkpoint_every == 0:
                save_checkpoint()
            bar.update(step_tokens if by_tokens else 1)
            postfix = {"loss": f"{row['loss']:.4f}", "tok/s": f"{step_tokens / max(elapsed, 1e-9):.0f}"}
            if evals:
                postfix[metric] = f"{evals[-1][metric]:.4f}"
            bar.set_postfix(postfix)
    finally:
        bar.close()

    if heldout and evals[-1]["step"] != step:
        evaluate_now()
    if best_step is not None and best_step != step:
        best = _load_best(run_dir, best_step, best_memory)
        if best is not None:
            log.info("restoring the best held-out weights of step %d (%s %.4f)", best_step, metric, best_eval)
            student.load_state_dict(best)
    assert stop is not None
    return TrainResult(steps=step, tokens=tokens, sequence_tokens=seq_tokens, seconds=seconds, stop_reason=stop,
                       device=str(dev), eval_metric=metric, history=history, evals=evals, best_step=best_step,
                       best_eval=best_eval, resumed_from=resumed_from)


def iter_steps(result: TrainResult) -> Iterator[tuple[int, float]]:
    for row in result.history:
        yield int(row["step"]), float(row["loss"])


def tokens_per_second(result: TrainResult) -> float:
    return result.tokens / result.seconds if result.seconds > 0 else math.nan
