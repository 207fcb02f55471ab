"""`awq` and `gptq`: 4-bit through llm-compressor (compression/awq_gptq.py), in our quantized format."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from shrinkserve.compression.calibration import CalibrationSpec, calibration_file
from shrinkserve.compression.methods.base import BuildJob, MethodOptions, register_method
from shrinkserve.compression.methods.weight_only import GroupSize, WeightOnlyHandler


class LibraryOptions(MethodOptions):
    group_size: GroupSize = 64
    symmetric: bool = False
    # The libraries leave the tied lm_head dense; 4/8 quantizes it in our own RTN path afterwards.
    lm_head_bits: Literal[4, 8] | None = 8
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def key_dump(self) -> dict[str, Any]:
        key = super().key_dump()
        if self.calibration.file is None:  # the shipped set: its content, like a user's file
            key["calibration"]["file"] = _hash_default()
        return key


def _hash_default() -> dict[str, str]:
    from shrinkserve.compression.methods.base import _cached_hash

    return {"sha256": _cached_hash(calibration_file(None))}


class LibraryHandler(WeightOnlyHandler):
    Options = LibraryOptions
    # The library computes the weights: its version (and its quantization backend's) is part of the key.
    tools = ("torch", "transformers", "llmcompressor", "compressed-tensors")

    def label(self, opts: MethodOptions) -> str:
        assert isinstance(opts, LibraryOptions)
        return f"{self.name}-w4g{opts.group_size}"

    def build(self, opts: MethodOptions, job: BuildJob) -> dict[str, Any]:
        from shrinkserve.compression.awq_gptq import quantize_with_library

        assert isinstance(opts, LibraryOptions)
        return quantize_with_library(self.name, job.inputs["base_hf"], job.out, opts)


@register_method("awq")
class Awq(LibraryHandler):
    pass


@register_method("gptq")
class Gptq(LibraryHandler):
    pass
