"""`hf`: the dense HF checkpoint itself (the base's, or a previous step's), served by the PyTorch engine."""

from __future__ import annotations

from typing import ClassVar

from shrinkserve.compression.methods.base import (
    ArtifactKind,
    MethodHandler,
    MethodOptions,
    Node,
    PlanContext,
    register_method,
)


class HfOptions(MethodOptions):
    pass


@register_method("hf")
class Hf(MethodHandler):
    Options = HfOptions
    engines = ("torch", "vllm")
    output: ClassVar[ArtifactKind] = "hf"

    def plan(self, opts: MethodOptions, ctx: PlanContext) -> Node:
        # Nothing of its own: a GGUF base is dequantized once (a shared node), an HF directory is served as is.
        return ctx.hf()
