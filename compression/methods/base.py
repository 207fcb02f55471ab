"""The method registry: one handler per compression method, registered by name.

A handler's `Options` (a pydantic model) is at once the recipe that goes into the cache key and the
input its `build` reads, so the two cannot drift. A profile's artifact is a small DAG of `Node`s
(base → method → `then:` steps), each an artifact of the content-addressed cache keyed by its
upstream keys + recipe + tool versions, or a source path on disk. See compression/methods/README.md
for how to add a method.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from shrinkserve.compression.base_model import Planned, tool_version
from shrinkserve.compression.cache import hash_path

if TYPE_CHECKING:
    from shrinkserve.compression.base_model import BaseSource

log = logging.getLogger("shrinkserve.methods")

# What a node's output is: an HF checkpoint directory (dense; every HF-input method can take it), a
# GGUF file, shrinkserve's quantized checkpoint (compression/quant_format.py; served as-is), or data
# (calibration text, captured traffic, prompts) that a method reads.
ArtifactKind = Literal["hf", "gguf", "quantized", "data"]


class MethodOptions(BaseModel):
    """Base of every method's options: the recipe. Unknown fields are errors, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def key_dump(self) -> dict[str, Any]:
        """The options as they enter the cache key: JSON values, with every file path replaced by the
        sha256 of its content (the key names the data, not where it lies)."""
        return _key_value(self)


def _key_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {name: _key_value(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, Path):
        return {"sha256": _cached_hash(value.expanduser().resolve())}
    if isinstance(value, (list, tuple)):
        return [_key_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _key_value(v) for k, v in value.items()}
    return value


@functools.lru_cache(maxsize=256)
def _hash_at(path: Path, size: int, mtime_ns: int) -> str:
    return hash_path(path)


def _cached_hash(path: Path) -> str:
    # Planning runs on every `profiles`/`status` call: a data file is hashed once per (size, mtime).
    st = path.stat()
    if path.is_dir():
        newest = max((p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()), default=st.st_mtime_ns)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return _hash_at(path, size, newest)
    return _hash_at(path, st.st_size, st.st_mtime_ns)


ProgressFactory = Callable[..., Any]  # (total=None, desc="", unit="it") -> a tqdm-like bar (update/close)


def tqdm_progress(total: int | None = None, desc: str = "", unit: str = "it") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None)


@dataclass
class BuildJob:
    """What a handler's `build` gets: its inputs on disk, the (temp) output directory, and helpers."""

    profile: str  # the profile being built (for messages)
    inputs: dict[str, Path]  # resolved inputs by the names `inputs()` gave them: a file or a directory
    out: Path  # empty directory; becomes the artifact atomically once build returns
    threads: int
    progress: ProgressFactory = tqdm_progress
    # A stable directory of this artifact's key (cache.work_dir; not created): state a build must find again
    # after being killed (training checkpoints). Removed by the cache once the artifact exists.
    work_dir: Path | None = None


@dataclass(eq=False)
class Node:
    """One vertex of a profile's build DAG: an artifact to find or build through the cache, or a source path."""

    kind: ArtifactKind
    plan: Planned | None = None
    build: Callable[[BuildJob], Mapping[str, Any] | None] | None = None
    deps: dict[str, Node] = field(default_factory=dict)
    source: Path | None = None  # an existing file/dir served or read as-is (a base, a user's file)
    digest: str | None = None  # content hash of `source`: what keys derived from it are made of
    entry: str | None = None  # file inside the artifact directory that consumers load; None = the directory
    base: bool = False  # the profile's base itself (so a GGUF base can be dequantized or requantized)

    @property
    def key(self) -> str | None:
        return self.plan.key if self.plan is not None else None

    @property
    def identity(self) -> str:
        """What a dependent node's key is made of: this node's cache key, or its source's content hash."""
        if self.plan is not None:
            return self.plan.key
        if self.digest is None:
            assert self.source is not None
            self.digest = hash_path(self.source)
        return self.digest

    @property
    def label(self) -> str:
        if self.plan is not None:
            return self.plan.name
        return str(self.source)


def artifact_node(
    kind: ArtifactKind, name: str, recipe: Mapping[str, Any], deps: Mapping[str, Node], tools: Mapping[str, str],
    build: Callable[[BuildJob], Mapping[str, Any] | None], entry: str | None = None,
) -> Node:
    """A node built through the cache; its key covers its inputs' identities, the recipe and the tools."""
    plan = Planned(name, dict(recipe), {k: d.identity for k, d in deps.items()}, dict(tools))
    return Node(kind, plan=plan, build=build, deps=dict(deps), entry=entry)


class PlanContext:
    """What a handler may ask for while planning: its upstream in the forms methods consume, data files,
    other profiles' outputs. Converters (base → HF checkpoint, HF → F16 GGUF) are shared DAG nodes, so two
    profiles of one base share one materialized checkpoint."""

    def __init__(
        self, profile: str, base: BaseSource, upstream: Node, *, threads: int,
        profile_output: Callable[[str], Node] | None = None,
    ) -> None:
        self.profile = profile
        self.base_source = base
        self.upstream = upstream
        self.threads = threads
        self._profile_output = profile_output

    # ---------------------------------------------------------------- inputs in the forms methods take
    def hf(self, node: Node | None = None) -> Node:
        """`node` (default: the upstream) as a dense HF checkpoint directory."""
        from shrinkserve.compression.methods.convert import hf_checkpoint_of

        return hf_checkpoint_of(node or self.upstream, self.base_source)

    def f16_gguf(self, node: Node | None = None) -> Node:
        """`node` (default: the upstream) as an F16 GGUF file."""
        from shrinkserve.compression.methods.convert import f16_gguf_of

        return f16_gguf_of(node or self.upstream, self.base_source, self.threads)

    def file(self, path: Path) -> Node:
        """A data file or directory as an input: its content hash joins the key."""
        path = path.expanduser().resolve()
        return Node("data", source=path, digest=_cached_hash(path))

    def profile_output(self, name: str) -> Node:
        """Another profile's final node (e.g. a distillation teacher), planned the same way."""
        if self._profile_output is None:
            raise ValueError(f"profile {self.profile!r}: other profiles are not available here")
        return self._profile_output(name)

    def name(self, label: str, upstream: Node | None = None) -> str:
        """Human-readable artifact name (the manifest's `name`): upstream's name + this step's label."""
        up = upstream or self.upstream
        if up.base or up.plan is None:
            return f"{self.base_source.name}/{label}"
        return f"{up.plan.name}+{label}"


class MethodHandler(ABC):
    """One compression method. Subclasses set the class attributes and override `inputs` + `build`
    (or `plan` for methods that only pass their input through)."""

    name: ClassVar[str]  # registry key: "rtn", "gguf", "distill", or an exact "family:variant" such as "gguf:file"
    Options: ClassVar[type[MethodOptions]]
    engines: ClassVar[tuple[str, ...]]  # engines that can serve the output; the first is the default
    output: ClassVar[ArtifactKind]
    # Kinds of upstream a `then:` step of this method accepts (empty: only ever a profile's first method).
    accepts: ClassVar[tuple[ArtifactKind, ...]] = ("hf",)
    tools: ClassVar[tuple[str, ...]] = ()  # distributions whose installed versions join the cache key
    tool_constants: ClassVar[Mapping[str, str]] = {}  # format versions of our own code that join the key
    variant_field: ClassVar[str | None] = None  # `family:<variant>` sets this option (gguf:q8_0 → type)
    variants: ClassVar[tuple[str, ...]] = ()  # the variants accepted in a method string
    # How a profile of this method loads when its YAML does not say (`load:`); a method whose build takes
    # long (distill: training) defaults to lazy, so a server does not wait on it at start-up.
    default_load: ClassVar[Literal["eager", "lazy"]] = "eager"
    # Whether the method's output keeps held-out traffic of its own (distill: the split it never trained
    # on), which evaluation scores the profile on against its teacher (`record["traffic"]`).
    heldout_traffic: ClassVar[bool] = False

    # ---------------------------------------------------------------- naming
    def method_names(self) -> list[str]:
        if self.variant_field is None:
            return [self.name]
        return [f"{self.name}:{v}" for v in self.variants]

    def canonical(self, opts: MethodOptions) -> str:
        if self.variant_field is None:
            return self.name
        return f"{self.name}:{getattr(opts, self.variant_field)}"

    def canonical_name(self, variant_fields: Mapping[str, Any]) -> str:
        """The canonical method string from the options a method string sets (see parse_method)."""
        if self.variant_field is None:
            return self.name
        return f"{self.name}:{variant_fields[self.variant_field]}"

    def label(self, opts: MethodOptions) -> str:
        """Short name of the step's artifact ("rtn-w4g64"); the default is the canonical method name."""
        return self.canonical(opts).replace(":", "-")

    # ---------------------------------------------------------------- the key
    def recipe(self, opts: MethodOptions) -> dict[str, Any]:
        return {"kind": self.name, **opts.key_dump()}

    def tool_versions(self) -> dict[str, str]:
        return {**{dist.replace("-", "_"): tool_version(dist) for dist in self.tools}, **self.tool_constants}

    # ---------------------------------------------------------------- planning and building
    def inputs(self, opts: MethodOptions, ctx: PlanContext) -> dict[str, Node]:
        """The nodes this method reads, by name (their paths reach `build` under the same names)."""
        return {"model": ctx.hf()}

    def build(self, opts: MethodOptions, job: BuildJob) -> Mapping[str, Any] | None:
        """Write the artifact into `job.out`; return extra manifest fields (JSON), or None."""
        raise NotImplementedError

    def entry(self, opts: MethodOptions) -> str | None:
        """The file inside the artifact that engines / later steps load; None = the directory."""
        return None

    def plan(self, opts: MethodOptions, ctx: PlanContext) -> Node:
        """This step's node: by default an artifact built by `build` from `inputs`."""
        return artifact_node(self.output, ctx.name(self.label(opts)), self.recipe(opts), self.inputs(opts, ctx),
                             self.tool_versions(), functools.partial(self.build, opts), self.entry(opts))


# ------------------------------------------------------------------------ the registry
_REGISTRY: dict[str, MethodHandler] = {}


def register_method(name: str) -> Callable[[type[MethodHandler]], type[MethodHandler]]:
    """Class decorator: `@register_method("rtn") class Rtn(MethodHandler): ...`."""

    def deco(cls: type[MethodHandler]) -> type[MethodHandler]:
        key = name.lower()
        if key in _REGISTRY and type(_REGISTRY[key]) is not cls:
            raise ValueError(f"method {name!r} is already registered by {type(_REGISTRY[key]).__name__}")
        cls.name = key
        _REGISTRY[key] = cls()
        return cls

    return deco


def unregister_method(name: str) -> None:
    """For tests that register a throw-away method."""
    _REGISTRY.pop(name.lower(), None)


def registered() -> dict[str, MethodHandler]:
    return dict(_REGISTRY)


def valid_method_names() -> list[str]:
    return [n for h in _REGISTRY.values() for n in h.method_names()]


def parse_method(text: str) -> tuple[MethodHandler, dict[str, Any]]:
    """`rtn`, `gguf:q8_0`, `gguf:file`, ... (case-insensitive) → (handler, options set by the variant)."""
    canonical = text.strip().lower()
    if canonical in _REGISTRY and _REGISTRY[canonical].variant_field is None:
        return _REGISTRY[canonical], {}
    family, _, variant = canonical.partition(":")
    handler = _REGISTRY.get(family)
    if handler is not None:
        if handler.variant_field is None and not variant:
            return handler, {}
        if handler.variant_field is not None and variant in handler.variants:
            return handler, {handler.variant_field: variant}
    raise ValueError(f"unknown method {text!r}; valid: {', '.join(valid_method_names())}")


def handler(text: str) -> MethodHandler:
    return parse_method(text)[0]
