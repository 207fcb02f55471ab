"""Profiles → artifacts: a small resolver over each profile's DAG of nodes (base → method → `then:` steps).

Planning is cheap (no builds, no hashing beyond the base's digest and data files' cached hashes), so
`status` and the cache keys come from the same plan that `build` resolves. Resolving a node looks up its
key first; only on a miss are its inputs resolved (and built if needed) inside the build, under the key's
lock, so a cached profile never touches its intermediate artifacts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shrinkserve.compression.base_model import BaseSource
from shrinkserve.compression.cache import Artifact, ArtifactCache
from shrinkserve.compression.methods.base import BuildJob, Node, PlanContext, ProgressFactory, tqdm_progress
from shrinkserve.compression.methods.convert import base_node, hf_checkpoint_of
from shrinkserve.compression.spec import BaseSpec, ProfileSpec

log = logging.getLogger("shrinkserve.profiles")


@dataclass
class BuiltProfile:
    """A profile's artifact on disk, ready for an engine to load."""

    name: str
    method: str
    engine: str
    path: Path  # GGUF file or HF checkpoint directory
    bytes: int
    cache_hit: bool
    build_seconds: float
    key: str | None = None  # cache key of the profile's own artifact (None when it serves a source as is)
    manifest: dict[str, Any] = field(default_factory=dict)
    # Content hash of the served source when there is no artifact of its own (None otherwise, or when the
    # source is a user's file nobody hashed yet): with `key`, what identifies the weights (capture records).
    source_digest: str | None = None


@dataclass
class ProfileStatus:
    """What `shrinkserve profiles` shows: cache state and size, without building anything.

    Reads like the dict it used to be (`status["path"]`), so `as_dict()` / item access both work.
    """

    name: str
    method: str
    engine: str | None
    load: str
    state: str  # cached | missing | corrupt | source | error
    path: str | None = None
    bytes: int | None = None
    key: str | None = None
    built_at: str | None = None
    error: str | None = None

    def __getitem__(self, item: str) -> Any:
        return getattr(self, item)

    def get(self, item: str, default: Any = None) -> Any:
        return getattr(self, item, default)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dir_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _entry_path(node: Node, art: Artifact) -> Path:
    return art.file(node.entry) if node.entry else art.path


def resolve(
    cache: ArtifactCache, node: Node, *, threads: int, profile: str = "", on_event: Callable[[str], None] | None = None,
    progress: ProgressFactory = tqdm_progress,
) -> tuple[Path, Artifact | None, bool]:
    """(path consumers load, artifact or None for a source, cache hit): found, or built with its inputs."""
    if node.plan is None:
        assert node.source is not None
        if not node.source.exists():
            raise FileNotFoundError(f"{node.source} does not exist")
        return node.source, None, True
    build = node.build
    assert build is not None

    def build_here(out: Path) -> Mapping[str, Any] | None:
        inputs = {name: resolve(cache, dep, threads=threads, profile=profile, progress=progress)[0]
                  for name, dep in node.deps.items()}
        log.info("building %s (%s)", node.plan.name if node.plan else "?", node.plan.recipe if node.plan else "")
        return build(BuildJob(profile=profile, inputs=inputs, out=out, threads=threads, progress=progress,
                              work_dir=cache.work_dir(node.plan.key) if node.plan else None))

    art, hit = node.plan.get_or_build(cache, build_here, on_event)
    return _entry_path(node, art), art, hit


@dataclass
class ProfilePlan:
    name: str
    spec: ProfileSpec
    node: Node  # the final step's output


class ProfileBuilder:
    """Builds (or finds in the cache) the artifact of each profile; one build at a time per process."""

    def __init__(
        self,
        cache: ArtifactCache,
        bases: Mapping[str, BaseSpec],
        profiles: Mapping[str, ProfileSpec],
        *,
        threads: int,
        on_cache_event: Callable[[str, str], None] | None = None,
        progress: ProgressFactory = tqdm_progress,
    ) -> None:
        self.cache = cache
        self.bases = dict(bases)
        self.profiles = dict(profiles)
        self.threads = threads
        self.progress = progress
        self._on_cache_event = on_cache_event
        self._sources: dict[str, BaseSource] = {}
        # Builds are CPU-bound on few cores: running two at once only makes both slower.
        self._lock = threading.RLock()

    def source(self, base_name: str) -> BaseSource:
        with self._lock:
            if base_name not in self._sources:
                self._sources[base_name] = BaseSource.resolve(base_name, self.bases[base_name].source)
            return self._sources[base_name]

    def _base_of(self, spec: ProfileSpec) -> BaseSource:
        return self.source(spec.base or next(iter(self.bases)))

    # ---------------------------------------------------------------- planning
    def plan(self, name: str, _seen: tuple[str, ...] = ()) -> ProfilePlan:
        """The profile's DAG, without building anything."""
        if name not in self.profiles:
            raise ValueError(f"unknown profile {name!r}")
        if name in _seen:
            raise ValueError(f"profiles depend on each other in a cycle: {' → '.join([*_seen, name])}")
        spec = self.profiles[name]
        base = self._base_of(spec)
        node = base_node(base)
        for step in spec.steps:
            ctx = PlanContext(name, base, node, threads=self.threads,
                              profile_output=lambda other: self.plan(other, (*_seen, name)).node)
            node = step.handler.plan(step.options, ctx)
        return ProfilePlan(name, spec, node)

    def key(self, name: str) -> str | None:
        """The cache key of the profile's artifact (None when it serves a source as is)."""
        return self.plan(name).node.key

    # ---------------------------------------------------------------- queries
    def reference_base(self, name: str, _seen: tuple[str, ...] = ()) -> str:
        """The base a profile's prose quality is measured against: its own, or for a student distilled from
        another profile (`teacher_profile`), the base that teacher derives from (whose tokenizer it shares)."""
        spec = self.profiles[name]
        teacher = getattr(spec.recipe, "teacher_profile", None)
        if teacher and teacher in self.profiles and teacher not in _seen:
            return self.reference_base(teacher, (*_seen, name))
        return spec.base or next(iter(self.bases))

    def reference_checkpoint(self, name: str) -> Path:
        """The full-precision HF checkpoint of the profile's reference base: what its quality is measured against."""
        base = self.source(self.reference_base(name))
        with self._lock:
            return resolve(self.cache, hf_checkpoint_of(base_node(base), base), threads=self.threads, profile=name,
                           progress=self.progress)[0]

    def resolve_node(self, node: Node, profile: str = "") -> Path:
        """The path consumers load for a planned node (found in the cache, or built with its inputs)."""
        with self._lock:
            return resolve(self.cache, node, threads=self.threads, profile=profile, progress=self.progress)[0]

    def status(self, name: str) -> ProfileStatus:
        spec = self.profiles[name]
        row = ProfileStatus(name=name, method=spec.pipeline, engine=spec.engine, load=spec.load, state="missing")
        try:
            node = self.plan(name).node
        except (OSError, ValueError) as exc:
            row.state, row.error = "error", str(exc)
            return row
        if node.plan is None:
            assert node.source is not None
            row.state, row.path, row.bytes = "source", str(node.source), _dir_bytes(node.source)
            return row
        row.key = node.key
        # "corrupt": a damaged artifact was found (here or by another process) and waits for its rebuild.
        art, row.state = self.cache.lookup_state(node.plan.key)
        if art is not None:
            path = _entry_path(node, art)
            row.state, row.path, row.bytes = "cached", str(path), _dir_bytes(path)
            row.built_at = art.manifest.get("built_at")
        return row

    # ---------------------------------------------------------------- building
    def build(self, name: str) -> BuiltProfile:
        spec = self.profiles[name]
        started = time.perf_counter()

        def on_event(event: str) -> None:
            if self._on_cache_event is not None:
                self._on_cache_event(name, event)

        with self._lock:
            node = self.plan(name).node
            path, art, hit = resolve(self.cache, node, threads=self.threads, profile=name, on_event=on_event,
                                     progress=self.progress)
        assert spec.engine is not None
        if art is None:  # a source served as is: nothing was built
            return BuiltProfile(name, spec.pipeline, spec.engine, path, _dir_bytes(path), True, 0.0,
                                source_digest=node.digest)
        size = art.bytes if node.entry is None else path.stat().st_size
        return BuiltProfile(name, spec.pipeline, spec.engine, path, size, hit, time.perf_counter() - started,
                            art.key, art.manifest)
