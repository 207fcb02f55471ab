"""`gguf:<type>`: llama.cpp's own quantizer on an F16 GGUF (the base's, or one our exporter wrote from an HF
checkpoint); `gguf:f16` is that F16 GGUF itself; `gguf:file` serves a user's GGUF file as is.

With `imatrix:` the quantizer weights each weight's error by its input column's mean x² (compression/imatrix.py):
computed by our PyTorch forward of the step's HF checkpoint on the shipped calibration text, captured traffic, or
read from a llama-imatrix file. The imatrix is an input node of the quantization (its data's digest and the
model's key are in the quantization's key), checked against the model before quantizing, and kept beside the
GGUF as `imatrix.gguf`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from shrinkserve.compression.base_model import tool_version
from shrinkserve.compression.gguf import GGUF_TYPES, NEEDS_IMATRIX, quantize_gguf
from shrinkserve.compression.imatrix import IMATRIX_FORMAT, IMATRIX_NAME, ImatrixOptions
from shrinkserve.compression.methods.base import (
    ArtifactKind,
    BuildJob,
    MethodHandler,
    MethodOptions,
    Node,
    PlanContext,
    artifact_node,
    register_method,
)

GgufType = Literal[tuple(GGUF_TYPES)]  # type: ignore[valid-type]

# Types an importance matrix cannot change: not quantized, or a quantizer that ignores it (ggml's
# quantize_q8_0 discards its quant_weights). Given one, a profile would be a plain quantization under an
# imatrix key, so it is an error.
NO_IMATRIX = ("f32", "f16", "bf16", "q8_0")


class GgufOptions(MethodOptions):
    type: GgufType  # type: ignore[valid-type]
    # Weight each weight's rounding error by its input column's mean x² (compression/imatrix.py).
    imatrix: ImatrixOptions | None = None

    @model_validator(mode="after")
    def _imatrix_changes_the_type(self) -> GgufOptions:
        if self.imatrix is not None and self.type in NO_IMATRIX:
            raise ValueError(f"an imatrix changes nothing for gguf:{self.type} (use it with q4_0, q4_k_m, q3_k_m, "
                             "q2_k, iq4_nl, ...)")
        if self.imatrix is None and self.type in NEEDS_IMATRIX:
            raise ValueError(f"gguf:{self.type} needs an imatrix (llama.cpp refuses to quantize to it without one): "
                             "add e.g. `imatrix: {source: calibration}`")
        return self


@register_method("gguf")
class Gguf(MethodHandler):
    Options = GgufOptions
    engines = ("llamacpp",)
    output: ClassVar[ArtifactKind] = "gguf"
    accepts: ClassVar[tuple[ArtifactKind, ...]] = ("hf",)  # a step's HF checkpoint → our export → quantize
    tools = ("llama_cpp_python",)
    variant_field = "type"
    variants = tuple(GGUF_TYPES)

    def label(self, opts: MethodOptions) -> str:
        assert isinstance(opts, GgufOptions)
        return str(opts.type) if opts.imatrix is None else f"{opts.type}-imatrix-{opts.imatrix.source}"

    def recipe(self, opts: MethodOptions) -> dict[str, Any]:
        recipe = super().recipe(opts)
        if recipe.get("imatrix") is None:  # plain quantizations keep the keys they had before the option
            recipe.pop("imatrix", None)
        return recipe

    def entry(self, opts: MethodOptions) -> str:
        assert isinstance(opts, GgufOptions)
        return f"model-{opts.type}.gguf"

    def inputs(self, opts: MethodOptions, ctx: PlanContext) -> dict[str, Node]:
        assert isinstance(opts, GgufOptions)
        nodes = {"base_f16": ctx.f16_gguf()}
        if opts.imatrix is not None:
            nodes["imatrix"] = imatrix_node(opts.imatrix, ctx)
        return nodes

    def plan(self, opts: MethodOptions, ctx: PlanContext) -> Node:
        assert isinstance(opts, GgufOptions)
        if opts.type == "f16":  # the shared F16 node itself (a base's requantization or our export)
            return ctx.f16_gguf()
        return super().plan(opts, ctx)

    def build(self, opts: MethodOptions, job: BuildJob) -> dict[str, Any] | None:
        assert isinstance(opts, GgufOptions)
        if opts.imatrix is None:
            quantize_gguf(job.inputs["base_f16"], job.out / self.entry(opts), opts.type, threads=job.threads)
            return None
        from shrinkserve.compression.imatrix import Imatrix, check_against_model

        im = Imatrix.read(job.inputs["imatrix"])
        check_against_model(im, job.inputs["base_f16"])  # a mismatch fails the build: nothing is cached
        # The keys llama-quantize writes when given --imatrix, so the GGUF says how it was made.
        metadata = {"quantize.imatrix.file": IMATRIX_NAME,
                    "quantize.imatrix.dataset": ",".join(im.datasets) or opts.imatrix.source,
                    "quantize.imatrix.entries_count": len(im.sums), "quantize.imatrix.chunks_count": im.chunk_count}
        quantize_gguf(job.inputs["base_f16"], job.out / self.entry(opts), opts.type, threads=job.threads,
                      imatrix=im.means(), metadata=metadata)
        im.write_gguf(job.out / IMATRIX_NAME)  # kept with the artifact: `llama-quantize --imatrix` reads it
        return {"imatrix": {"source": opts.imatrix.source, "datasets": im.datasets, "tokens": im.tokens,
                            "entries": len(im.sums), "sha256": im.digest(), "file": IMATRIX_NAME}}


def imatrix_node(opts: ImatrixOptions, ctx: PlanContext) -> Node:
    """The imatrix a quantization reads: a user's file as it is, or one computed from text or traffic on the
    step's HF checkpoint, a cached artifact of its own (so every quantization type of the same recipe shares
    it). Either way its content (the data's digest, the model's key) is part of the quantization's key."""
    if opts.source == "file":
        return ctx.file(opts.data_path())

    def build(job: BuildJob) -> dict[str, Any]:
        from shrinkserve.compression.imatrix import compute_imatrix

        im = compute_imatrix(job.inputs["model"], opts, job.inputs["data"], threads=job.threads,
                             progress=job.progress)
        im.write_gguf(job.out / IMATRIX_NAME)
        return {"tokens": im.tokens, "sequences": im.chunk_count, "entries": len(im.sums), "sha256": im.digest()}

    recipe = {"kind": "imatrix", "source": opts.source, "max_tokens": opts.max_tokens, "seq_len": opts.seq_len}
    tools = {"torch": tool_version("torch"), "transformers": tool_version("transformers"),
             "gguf": tool_version("gguf"), "imatrix_format": IMATRIX_FORMAT}
    deps = {"model": ctx.hf(), "data": ctx.file(opts.data_path())}
    return artifact_node("data", ctx.name(f"imatrix-{opts.source}"), recipe, deps, tools, build, IMATRIX_NAME)


class GgufFileOptions(MethodOptions):
    path: Path  # a GGUF file served as is

    def key_dump(self) -> dict:  # nothing is built from it, so it never enters a key (and is not hashed)
        return {"path": str(self.path)}


@register_method("gguf:file")
class GgufFile(MethodHandler):
    Options = GgufFileOptions
    engines = ("llamacpp",)
    output: ClassVar[ArtifactKind] = "gguf"
    accepts = ()

    def method_names(self) -> list[str]:
        return ["gguf:file"]

    def canonical(self, opts: MethodOptions) -> str:
        return "gguf:file"

    def plan(self, opts: MethodOptions, ctx: PlanContext) -> Node:
        assert isinstance(opts, GgufFileOptions)
        return Node("gguf", source=opts.path.expanduser().resolve())
