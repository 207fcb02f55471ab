"""`gguf:<type>`: llama.cpp's own quantizer on an F16 GGUF (the base's, or one our exporter wrote from an HF
checkpoint); `gguf:f16` is that F16 GGUF itself; `gguf:file` serves a user's GGUF file as is."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from shrinkserve.compression.gguf import GGUF_TYPES, quantize_gguf
from shrinkserve.compression.methods.base import (
    ArtifactKind,
    BuildJob,
    MethodHandler,
    MethodOptions,
    Node,
    PlanContext,
    register_method,
)

GgufType = Literal[tuple(GGUF_TYPES)]  # type: ignore[valid-type]


class GgufOptions(MethodOptions):
    type: GgufType  # type: ignore[valid-type]


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
        return str(opts.type)

    def entry(self, opts: MethodOptions) -> str:
        assert isinstance(opts, GgufOptions)
        return f"model-{opts.type}.gguf"

    def inputs(self, opts: MethodOptions, ctx: PlanContext) -> dict[str, Node]:
        return {"base_f16": ctx.f16_gguf()}

    def plan(self, opts: MethodOptions, ctx: PlanContext) -> Node:
        assert isinstance(opts, GgufOptions)
        if opts.type == "f16":  # the shared F16 node itself (a base's requantization or our export)
            return ctx.f16_gguf()
        return super().plan(opts, ctx)

    def build(self, opts: MethodOptions, job: BuildJob) -> None:
        assert isinstance(opts, GgufOptions)
        quantize_gguf(job.inputs["base_f16"], job.out / self.entry(opts), opts.type, threads=job.threads)


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
