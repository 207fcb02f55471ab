"""Weight-only quantization, stored as compressed-tensors pack-quantized checkpoints
(compression/compressed_tensors.py) and served by the PyTorch engine through shrinkserve.kernels or by vLLM:
int8 (per channel, symmetric), rtn (4-bit per group), and prequantized (a user's GPTQ/AWQ checkpoint as the
base, converted)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from shrinkserve.compression.methods.base import (
    ArtifactKind,
    BuildJob,
    MethodHandler,
    MethodOptions,
    Node,
    PlanContext,
    register_method,
)

GroupSize = Literal[32, 64, 128]


class WeightOnlyHandler(MethodHandler):
    engines = ("torch", "vllm")
    output: ClassVar[ArtifactKind] = "quantized"
    tools = ("torch", "transformers")
    # 1: shrinkserve's own format (compression/quant_format.py); 2: compressed-tensors pack-quantized. Artifacts of
    # format 1 stay readable; the new value gives every weight-only profile a new key, so it rebuilds once.
    tool_constants: ClassVar[Mapping[str, str]] = {"quant_format": "2"}

    def inputs(self, opts: MethodOptions, ctx: PlanContext) -> dict[str, Node]:
        return {"base_hf": ctx.hf()}


class Int8Options(MethodOptions):
    # The tied output projection: int8 per channel, 4-bit per group, or kept dense (None).
    lm_head_bits: Literal[4, 8] | None = 8
    # Only for a 4-bit lm_head: its group size and zero-point scheme (the linears are per-channel int8).
    group_size: GroupSize | None = None
    symmetric: bool | None = None

    @model_validator(mode="after")
    def _head_options(self) -> Int8Options:
        if self.lm_head_bits == 4:
            # Defaults filled in here so the key holds the values the build uses.
            object.__setattr__(self, "group_size", self.group_size or 64)
            object.__setattr__(self, "symmetric", bool(self.symmetric))
        elif self.group_size is not None or self.symmetric is not None:
            raise ValueError("int8: 'group_size' and 'symmetric' only apply with lm_head_bits: 4 "
                             "(int8 linears are quantized per channel)")
        return self


@register_method("int8")
class Int8(WeightOnlyHandler):
    Options = Int8Options

    def label(self, opts: MethodOptions) -> str:
        assert isinstance(opts, Int8Options)
        head = "dense" if opts.lm_head_bits is None else f"{opts.lm_head_bits}"
        return f"int8-w8-head{head}" + (f"g{opts.group_size}" if opts.lm_head_bits == 4 else "")

    def build(self, opts: MethodOptions, job: BuildJob) -> dict[str, Any]:
        from shrinkserve.compression.rtn import quantize_rtn

        assert isinstance(opts, Int8Options)
        return quantize_rtn(job.inputs["base_hf"], job.out, bits=8, group_size=opts.group_size or 64,
                            symmetric=bool(opts.symmetric), lm_head_bits=opts.lm_head_bits)


class RtnOptions(MethodOptions):
    group_size: GroupSize = 64  # along the input dimension
    symmetric: bool = False  # zero point 8 (symmetric) or per group (asymmetric)
    lm_head_bits: Literal[4, 8] | None = 8


@register_method("rtn")
class Rtn(WeightOnlyHandler):
    Options = RtnOptions

    def label(self, opts: MethodOptions) -> str:
        assert isinstance(opts, RtnOptions)
        return f"rtn-w4g{opts.group_size}"

    def build(self, opts: MethodOptions, job: BuildJob) -> dict[str, Any]:
        from shrinkserve.compression.rtn import quantize_rtn

        assert isinstance(opts, RtnOptions)
        return quantize_rtn(job.inputs["base_hf"], job.out, bits=4, group_size=opts.group_size,
                            symmetric=opts.symmetric, lm_head_bits=opts.lm_head_bits)


class PrequantizedOptions(MethodOptions):
    pass  # everything is decided by the source checkpoint, whose content hash is the key's input


@register_method("prequantized")
class Prequantized(WeightOnlyHandler):
    Options = PrequantizedOptions
    accepts = ()

    def inputs(self, opts: MethodOptions, ctx: PlanContext) -> dict[str, Node]:
        up = ctx.upstream
        if not (up.base and up.kind == "hf"):
            raise ValueError(f"profile {ctx.profile!r}: 'prequantized' needs a GPTQ/AWQ checkpoint directory "
                             "as its base")
        return {"base_hf": up}

    def build(self, opts: MethodOptions, job: BuildJob) -> dict[str, Any]:
        from shrinkserve.compression.prequantized import import_prequantized

        return import_prequantized(job.inputs["base_hf"], job.out)
