"""`method: distill` in the method registry (compression/methods/): the student as a DAG of
cached nodes, so `then: gguf:q8_0` (or any HF-input method) quantizes it like any HF checkpoint.

    teacher (HF node: the profile's base, or `teacher_profile`'s output)
      ├─ teacher-data   ← prompts file        (synthetic prompts only; entry records/: capture segments)
      ├─ capture files  (content-hashed data nodes)
      ├─ student-init   ← teacher + data      (BI pruning; manifest extra "prune": layers and scores)
      └─ distill        ← teacher + student-init + data  (the recipe = DistillOptions.key_dump())

Registered by compression/methods/__init__.py, after the built-in methods. This module is the only part of
compression/distill/ that needs the registry.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from shrinkserve.compression.distill import pipeline
from shrinkserve.compression.distill.data import DistillExample
from shrinkserve.compression.distill.options import NOT_IN_KEY, DistillOptions
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

if TYPE_CHECKING:
    from shrinkserve.compression.pipeline import ProfileBuilder


class DistillMethodOptions(DistillOptions, MethodOptions):
    """DistillOptions as the registry's options type; its key_dump (paths → content hashes, without the
    options that do not change the result: device, checkpoint_every) is the recipe."""

    def key_dump(self) -> dict[str, Any]:
        # The registry's dump hashes data files once per (size, mtime): planning runs on every `status`.
        return {k: v for k, v in MethodOptions.key_dump(self).items() if k not in NOT_IN_KEY}


def _data_paths(job: BuildJob) -> list[Path]:
    return [p for name, p in sorted(job.inputs.items()) if name.startswith(("capture", "synthetic"))]


@register_method("distill")
class Distill(MethodHandler):
    Options = DistillMethodOptions
    engines = ("torch", "vllm")
    output: ClassVar[ArtifactKind] = "hf"
    accepts: ClassVar[tuple[ArtifactKind, ...]] = ()  # a profile's first method: its input is a teacher
    tools = ("torch", "transformers")
    tool_constants: ClassVar[Mapping[str, str]] = {"shrinkserve_distill": pipeline.DISTILL_FORMAT}
    # Training takes minutes to hours: a distill profile loads lazily unless its YAML says otherwise.
    default_load: ClassVar[Literal["eager", "lazy"]] = "lazy"
    heldout_traffic: ClassVar[bool] = True

    def label(self, opts: MethodOptions) -> str:
        assert isinstance(opts, DistillOptions)
        return f"distill-{opts.loss.kind}"

    def recipe(self, opts: MethodOptions) -> dict[str, Any]:
        return {"kind": self.name, **opts.key_dump()}

    def plan(self, opts: MethodOptions, ctx: PlanContext) -> Node:
        assert isinstance(opts, DistillOptions)
        source = ctx.profile_output(opts.teacher_profile) if opts.teacher_profile else ctx.upstream
        teacher = ctx.hf(source)
        tools = self.tool_versions()
        data: dict[str, Node] = {f"capture{i}": ctx.file(Path(p)) for i, p in enumerate(opts.data.capture)}
        teacher_name = opts.teacher_profile or ctx.profile
        if opts.data.synthetic is not None:
            syn = opts.data.synthetic
            recipe = {"kind": "teacher-data", **syn.model_dump(exclude={"prompts"})}
            build = functools.partial(_build_data, syn=syn, teacher_name=teacher_name, teacher_id=teacher.identity)
            data["synthetic"] = artifact_node("data", ctx.name("teacher-data", teacher), recipe,
                                              {"teacher": teacher, "prompts": ctx.file(syn.prompts)},
                                              {**tools, "generator": pipeline.teacher_data_generator()}, build,
                                              pipeline.RECORDS_DIR)
        init_recipe = {"kind": "prune", **opts.student.model_dump(), "max_len": opts.optimizer.max_len,
                       "heldout_fraction": opts.data.heldout_fraction, "max_examples": opts.data.max_examples,
                       "seed": opts.seed}
        init = artifact_node("hf", ctx.name("student-init", teacher), init_recipe, {"teacher": teacher, **data},
                             tools, functools.partial(_build_init, opts=opts))
        return artifact_node("hf", ctx.name(self.label(opts), teacher), self.recipe(opts),
                             {"teacher": teacher, "student_init": init, **data}, tools,
                             functools.partial(_build_student, opts=opts))


def _build_data(job: BuildJob, *, syn: Any, teacher_name: str, teacher_id: str) -> dict[str, Any]:
    return pipeline.generate_synthetic(job.inputs["teacher"], syn, job.out, teacher_name=teacher_name,
                                       teacher_key=teacher_id, threads=job.threads)


def _build_init(job: BuildJob, *, opts: DistillOptions) -> dict[str, Any]:
    return pipeline.prune_step(job.inputs["teacher"], _data_paths(job), opts, job.out, threads=job.threads)


def _build_student(job: BuildJob, *, opts: DistillOptions) -> dict[str, Any]:
    # Training checkpoints go to the key's work dir, which outlives this build's temp dir: a build killed at
    # any point resumes from them; the cache removes them once the student's artifact is in place.
    if job.work_dir is None:
        raise ValueError("a distillation build needs the cache's work directory for its checkpoints")
    return pipeline.distill_step(job.inputs["teacher"], job.inputs["student_init"], _data_paths(job), opts,
                                 job.out, job.work_dir, threads=job.threads)


def find_distill_node(node: Node) -> Node | None:
    """The distill step at or upstream of a profile's final node (a `then:` chain's GGUF or int8 included)."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.plan is not None and n.plan.recipe.get("kind") == "distill":
            return n
        stack.extend(n.deps.values())
    return None


@dataclass(frozen=True)
class HeldoutTraffic:
    """What a profile derived from a student is measured on against the student's teacher."""

    teacher: Path  # the teacher's HF checkpoint (scored in float32 on the PyTorch engine)
    teacher_identity: str  # its cache key or content hash
    student_key: str
    examples: list[DistillExample]


def heldout_traffic(builder: ProfileBuilder, name: str) -> HeldoutTraffic | None:
    """The held-out split of the traffic the profile's student was distilled from, and that student's teacher;
    None for a profile without a distill step. Builds nothing that building the profile did not."""
    node = find_distill_node(builder.plan(name).node)
    if node is None:
        return None
    teacher = node.deps["teacher"]
    student = builder.resolve_node(node, name)
    assert node.key is not None
    return HeldoutTraffic(builder.resolve_node(teacher, name), teacher.identity, node.key,
                          pipeline.heldout_examples(student))
