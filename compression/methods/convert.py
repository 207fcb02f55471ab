"""Format converters shared by every method: a base (or a step's output) as an HF checkpoint directory
or as an F16 GGUF. They are DAG nodes like any method's, so they are built once and cached."""

from __future__ import annotations

from shrinkserve.compression.base_model import (
    F16_GGUF_NAME,
    BaseSource,
    materialize_hf_checkpoint,
    plan_f16_gguf,
    plan_hf_checkpoint,
    tool_version,
)
from shrinkserve.compression.methods.base import BuildJob, Node, artifact_node

# Bump when the exporter's output changes for the same input (it is part of the export's cache key).
GGUF_EXPORT_VERSION = "1"


def base_node(base: BaseSource) -> Node:
    return Node("hf" if base.kind == "hf" else "gguf", source=base.path, digest=base.digest, base=True)


def hf_checkpoint_of(node: Node, base: BaseSource) -> Node:
    """`node` as a dense HF checkpoint directory: itself, or the GGUF base dequantized by transformers."""
    if node.kind == "hf":
        return node
    if node.base and node.kind == "gguf":
        return Node("hf", plan=plan_hf_checkpoint(base),
                    build=lambda job: materialize_hf_checkpoint(base.path, job.out))
    raise ValueError(f"{node.label}: a {node.kind} artifact cannot be turned into an HF checkpoint; "
                     "put methods that need one first, or derive from an HF checkpoint")


def _is_f16_gguf(node: Node) -> bool:
    return node.kind == "gguf" and node.plan is not None and node.plan.recipe.get("type") == "f16"


def f16_gguf_of(node: Node, base: BaseSource, threads: int) -> Node:
    """`node` as an F16 GGUF: itself, the GGUF base requantized by llama.cpp, or an HF checkpoint
    written by our exporter (compression/gguf_export.py)."""
    from shrinkserve.compression.gguf import quantize_gguf

    if _is_f16_gguf(node):
        return node
    if node.base and node.kind == "gguf":
        def requantize(job: BuildJob) -> None:
            quantize_gguf(base.path, job.out / F16_GGUF_NAME, "f16", threads=job.threads)

        return Node("gguf", plan=plan_f16_gguf(base), build=requantize, entry=F16_GGUF_NAME)
    if node.kind == "hf":
        def export(job: BuildJob) -> dict:
            from shrinkserve.compression.gguf_export import export_hf_to_gguf

            return export_hf_to_gguf(job.inputs["hf"], job.out / F16_GGUF_NAME, progress=job.progress)

        name = f"{base.name}/gguf-f16" if node.base or node.plan is None else f"{node.plan.name}+gguf-f16"
        return artifact_node("gguf", name, {"kind": "gguf-export", "type": "f16"}, {"hf": node},
                             {"gguf": tool_version("gguf"), "transformers": tool_version("transformers"),
                              "gguf_export": GGUF_EXPORT_VERSION}, export, F16_GGUF_NAME)
    raise ValueError(f"{node.label}: a {node.kind} artifact cannot be converted to GGUF "
                     "(GGUF types are made from an HF checkpoint or an F16 GGUF)")
