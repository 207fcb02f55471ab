"""Options of `method: distill` — the recipe that is at once the student's cache key and its build input.

A profile, flat as every profile (the options below are lifted into the method's options by the spec):

    profiles:
      iso-student:
        method: distill
        teacher_profile: smollm2        # a profile whose output is an HF checkpoint; default: this profile's base
        student: {drop_layers: 10, mlp_ratio: 1.0}
        data:
          synthetic: {prompts: my_task_prompts.jsonl}
          capture: [/var/lib/shrinkserve/capture]
          heldout_fraction: 0.1
        loss: {kind: kd}                # kd (full vocab, teacher in-process) | topk (records: top-k + tail) | ce
        budget: {tokens: 20000, seconds: 1800}
        optimizer: {lr: 2.0e-4, batch: 8, accum: 1}
        device: auto                    # cuda when present (bf16 autocast), else cpu
        load: lazy                      # serving policy, not part of the recipe: training is long
        then: gguf:q8_0                 # optional: quantize the student

Every default works on a 2-core CPU box, where a useful run is a narrow task (budget ≈ 20k response tokens,
≈ 30 min); with a GPU the same recipe trains ~1000× faster, so raise the budget there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from shrinkserve.compression.distill.train import TrainConfig

# The loss kinds (compression/distill/losses.py). Defined here so that reading a profile (and registering the
# method) does not import torch: every CLI command loads the settings.
LossKind = Literal["kd", "topk", "ce"]

# Options that change how a build runs but not what it computes: not part of the cache key.
NOT_IN_KEY = ("device", "checkpoint_every")


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StudentShape(_Options):
    """The student = the teacher minus layers of lowest Block Influence (first and last kept), optionally
    with narrower MLPs. Exactly one of drop_layers / n_layers (default: drop 10, the issue's 20-layer student
    of the 30-layer default model)."""

    drop_layers: int | None = Field(default=None, ge=0)
    n_layers: int | None = Field(default=None, ge=2)
    mlp_ratio: float = Field(default=1.0, gt=0.0, le=1.0, description="fraction of MLP channels kept")
    mlp_multiple: int = Field(default=256, ge=1, description="MLP width rounded to this (K-quants need 256)")
    calibration_samples: int = Field(default=64, ge=1, description="training sequences that measure BI")
    calibration_len: int = Field(default=256, ge=8)

    @model_validator(mode="before")
    @classmethod
    def _default_depth(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("drop_layers") is None and data.get("n_layers") is None:
            return {**data, "drop_layers": 10}
        return data

    @model_validator(mode="after")
    def _one_depth(self) -> StudentShape:
        if self.drop_layers is not None and self.n_layers is not None:
            raise ValueError("give drop_layers or n_layers, not both")
        return self


class SyntheticData(_Options):
    """Teacher answers to prompts from a file, generated in-process with recorded distributions."""

    prompts: Path = Field(description="one prompt per line, or JSONL with 'prompt' (+ 'system') / 'messages'")
    temperature: float = Field(default=0.8, ge=0.0, le=5.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(default=128, ge=1, le=4096)
    top_k: int = Field(default=20, ge=1, le=100, description="teacher logprobs kept per token")
    seed: int = 0

    @field_validator("prompts")
    @classmethod
    def _exists(cls, v: Path) -> Path:
        if not v.expanduser().is_file():
            raise ValueError(f"prompt file {v} does not exist")
        return v


class DataSource(_Options):
    capture: list[Path] = Field(default_factory=list, description="capture files or directories")
    synthetic: SyntheticData | None = None
    heldout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="whole prompts kept out of training")
    max_examples: int | None = Field(default=None, ge=1, description="use at most this many records")

    @field_validator("capture")
    @classmethod
    def _exist(cls, v: list[Path]) -> list[Path]:
        for p in v:
            if not p.expanduser().exists():
                raise ValueError(f"capture path {p} does not exist")
        return v

    @model_validator(mode="after")
    def _some(self) -> DataSource:
        if not self.capture and self.synthetic is None:
            raise ValueError("distillation needs data: capture files, synthetic prompts, or both")
        return self


class LossOptions(_Options):
    kind: LossKind = "kd"
    top_k: int | None = Field(default=None, ge=1, description="topk: use at most this many recorded entries")
    include_sampled: bool = False
    mix: float = Field(default=0.0, ge=0.0, le=1.0, description="(1 − mix)·KL + mix·CE")


class BudgetOptions(_Options):
    """The first limit reached ends training (seconds: wall clock, summed over resumes)."""

    tokens: int | None = Field(default=20_000, ge=1, description="response tokens trained on")
    seconds: float | None = Field(default=1800.0, gt=0)
    steps: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _bounded(self) -> BudgetOptions:
        if self.tokens is None and self.seconds is None and self.steps is None:
            raise ValueError("a budget needs tokens, seconds or steps")
        return self


class OptimizerOptions(_Options):
    lr: float = Field(default=2e-4, gt=0)
    batch: int = Field(default=8, ge=1)
    accum: int = Field(default=1, ge=1)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    max_len: int = Field(default=512, ge=8)
    freeze_embeddings: bool = False


class EvalOptions(_Options):
    every: int = Field(default=50, ge=1, description="optimizer steps between held-out evaluations")
    examples: int = Field(default=32, ge=1)
    patience: int = Field(default=3, ge=0, description="evaluations without improvement before stopping; 0 = never")
    min_delta: float = Field(default=0.0, ge=0)


class DistillOptions(_Options):
    teacher_profile: str | None = Field(default=None, description="default: the profile's own base")
    student: StudentShape = Field(default_factory=StudentShape)
    data: DataSource
    loss: LossOptions = Field(default_factory=LossOptions)
    budget: BudgetOptions = Field(default_factory=BudgetOptions)
    optimizer: OptimizerOptions = Field(default_factory=OptimizerOptions)
    evaluation: EvalOptions = Field(default_factory=EvalOptions)
    checkpoint_every: int = Field(default=50, ge=1, description="optimizer steps between resumable checkpoints")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    def train_config(self) -> TrainConfig:
        from shrinkserve.compression.distill.train import TrainConfig

        o, b, e = self.optimizer, self.budget, self.evaluation
        return TrainConfig(
            loss=self.loss.kind, top_k=self.loss.top_k, include_sampled=self.loss.include_sampled, mix=self.loss.mix,
            lr=o.lr, batch=o.batch, accum=o.accum, weight_decay=o.weight_decay, warmup_steps=o.warmup_steps,
            grad_clip=o.grad_clip, max_len=o.max_len, freeze_embeddings=o.freeze_embeddings,
            tokens=b.tokens, seconds=b.seconds, steps=b.steps, eval_every=e.every, eval_examples=e.examples,
            patience=e.patience, min_delta=e.min_delta, checkpoint_every=self.checkpoint_every, seed=self.seed,
        )

    def key_dump(self) -> dict[str, Any]:
        """The recipe as it enters the cache key: JSON values, file paths replaced by their content's sha256,
        without the options that do not change the result (NOT_IN_KEY)."""
        return {k: v for k, v in _key_value(self).items() if k not in NOT_IN_KEY}


def _key_value(value: Any) -> Any:
    from shrinkserve.compression.cache import hash_path

    if isinstance(value, BaseModel):
        return {name: _key_value(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, Path):
        return {"sha256": hash_path(value.expanduser().resolve())}
    if isinstance(value, (list, tuple)):
        return [_key_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _key_value(v) for k, v in value.items()}
    return value
