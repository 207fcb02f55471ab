"""`method: distill` in the method registry (compression/methods/, capture branch): the student as a DAG of
cached nodes, so `then: gguf:q8_0` (or any HF-input method) quantizes it like any HF checkpoint.

    teacher (HF node: the profile's base, or `teacher_profile`'s output)
      ├─ teacher-data   ← prompts file        (synthetic prompts only; entry records/: capture segments)
      ├─ capture files  (content-hashed data nodes)
      ├─ student-init   ← teacher + data      (BI pruning; manifest extra "prune": layers and scores)
      └─ distill        ← teacher + student-init + data  (the recipe = DistillOptions.key_dump())

Registration: import this module once the registry is loaded (compression/methods/__init__.py:
`from shrinkserve.compression.distill import method as _distill  # noqa: F401`), after the built-in methods.
This module is the only part of compression/distill/ that needs the registry.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from shrinkserve.compression.distill import pipeline
from shrinkserve.compression.distill.options import DistillOptions
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


class DistillMethodOptions(DistillOptions, MethodOptions):
    """DistillOptions as the registry's options type; its key_dump (paths → content hashes, without the
    options that do not change the result: device, checkpoint_every) is the recipe."""


def _data_paths(job: BuildJob) -> list[Path]:
    return [p for name, p in sorted(job.inputs.items()) if name.startswith(("capture", "synthetic"))]


def _run_dir(job: BuildJob, key: str) -> Path:
    # Checkpoints must outlive the build's temp directory (a killed build resumes from them). BuildJob has
    # no stable per-key directory yet; the temp dir lies in <cache>/tmp/, so its grandparent is the cache root.
    work = getattr(job, "work_dir", None)
    return Path(work) if work is not None else job.out.parent.parent / "distill-runs" / key


@register_method("distill")
class Distill(MethodHandler):
    Options = DistillMethodOptions
    engines = ("torch", "vllm")
    output: ClassVar[ArtifactKind] = "hf"
    accepts: ClassVar[tuple[ArtifactKind, ...]] = ()  # a profile's first method: its input is a teacher
    tools = ("torch", "transformers")
    tool_constants: ClassVar[Mapping[str, str]] = {"shrinkserve_distill": pipeline.DISTILL_FORMAT}
    # Training takes minutes to hours: a distill profile should load lazily unless its YAML says otherwise
    # (ProfileSpec.load defaults to eager; the spec should honour this when `load` is not set).
    default_load: ClassVar[str] = "lazy"

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
        node = artifact_node("hf", ctx.name(self.label(opts), teacher), self.recipe(opts),
                             {"teacher": teacher, "student_init": init, **data}, tools, lambda job: None)
        assert node.plan is not None
        node.build = functools.partial(_build_student, opts=opts, key=node.plan.key)
        return node


def _build_data(job: BuildJob, *, syn: Any, teacher_name: str, teacher_id: str) -> dict[str, Any]:
    return pipeline.generate_synthetic(job.inputs["teacher"], syn, job.out, teacher_name=teacher_name,
                                       teacher_key=teacher_id, threads=job.threads)


def _build_init(job: BuildJob, *, opts: DistillOptions) -> dict[str, Any]:
    return pipeline.prune_step(job.inputs["teacher"], _data_paths(job), opts, job.out, threads=job.threads)


def _build_student(job: BuildJob, *, opts: DistillOptions, key: str) -> dict[str, Any]:
    run_dir = _run_dir(job, key)
    _sweep_finished_runs(run_dir.parent, job.out.parent.parent / "artifacts")
    # The run dir is kept until the artifact exists (the cache renames job.out into place after this returns):
    # if that rename failed, a retry would resume from the final checkpoint instead of training again.
    return pipeline.distill_step(job.inputs["teacher"], job.inputs["student_init"], _data_paths(job), opts,
                                 job.out, run_dir, threads=job.threads)


def _sweep_finished_runs(runs: Path, artifacts: Path) -> None:
    """Remove the checkpoints of students whose artifact is in the cache (their training is over)."""
    if not runs.is_dir():
        return
    for run in runs.iterdir():
        if (artifacts / run.name).is_dir():
            shutil.rmtree(run, ignore_errors=True)


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
