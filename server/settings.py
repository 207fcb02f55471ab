"""Server configuration: `SHRINKSERVE_*` environment variables over one YAML file over defaults.

The YAML file declares bases (where weights come from), profiles (how each deployment is derived
from a base and which engine serves it) and routes (URL prefix → profile).
"""

from __future__ import annotations

import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from shrinkserve.compression.profiles import BaseSpec, ProfileSpec
from shrinkserve.compression.quality import EvalSet
from shrinkserve.compression.traffic.writer import CaptureSettings

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def default_config_path() -> Path:
    return Path(str(resources.files("shrinkserve.server").joinpath("default_config.yaml")))


def cgroup_cpu_limit(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Whole CPUs a cgroup v2 quota allows ("200000 100000" → 2), or None when unlimited or unknown."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def default_threads() -> int:
    # The CPUs this process may run on (taskset narrows them) and, in a container, its CPU quota: a pod
    # limited to 2 CPUs on a 64-core node would otherwise spin 64 threads on 2 CPUs' worth of time.
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, cgroup_cpu_limit() or cpus))


class EvaluationSettings(BaseModel):
    """How profiles are measured against their base (compression/quality.py)."""

    model_config = ConfigDict(extra="forbid")

    # Evaluate a profile once it is loaded, when its artifact has no record for the current eval set.
    on_build: bool = True
    max_tokens: int | None = Field(default=None, ge=64, description="held-out tokens used; None = all (~3.5k)")
    tasks: int | None = Field(default=None, ge=1, description="task items used; None = all")
    # A distilled student is also scored on the held-out split of its traffic, which grows with the capture
    # it trained on (10% of it by default): its first examples up to this many response tokens are used.
    traffic_tokens: int | None = Field(default=4096, ge=16, description="held-out traffic tokens scored per "
                                                                         "student; None = all")
    # Serve profiles that fail their quality gate anyway (they stay marked as failing in /v1/models).
    serve_rejected: bool = False
    # vLLM profiles are scored by the PyTorch engine on the same artifact; at every load the vLLM server must
    # reproduce that engine's teacher-forced top-1 on 256 held-out tokens at least this often, else the profile
    # is rejected like a failed gate (measured on vLLM-CPU: 0.965-0.984 for int4 artifacts of the default model).
    min_vllm_agreement: float = Field(default=0.9, ge=0, le=1)

    def evalset(self) -> EvalSet:
        return EvalSet.load(max_tokens=self.max_tokens, tasks=self.tasks)


Scheduler = Literal["batching", "serial"]


class ServingPolicy(BaseModel):
    """How one profile is served; every field unset inherits `serving`'s value."""

    model_config = ConfigDict(extra="forbid")

    scheduler: Scheduler | None = None
    max_num_seqs: int | None = Field(default=None, ge=1, le=256)
    kv_cache_tokens: int | None = Field(default=None, ge=16)
    idle_kv_tokens: int | None = Field(default=None, ge=0)
    max_queue: int | None = Field(default=None, ge=0, le=10_000)


class ServingSettings(BaseModel):
    """Scheduling, concurrency and KV memory of every profile (runtime/batching.py), with per-profile overrides.

    A profile's legacy `max_concurrency` / `max_queue` keys, when set, count as its `max_num_seqs` /
    `max_queue` unless `serving.profiles.<name>` says otherwise.
    """

    model_config = ConfigDict(extra="forbid")

    # batching: one scheduler thread per profile runs ONE forward over all its running sequences per
    # step; serial: one sequence at a time (every step alone, deterministic, no batching gain).
    scheduler: Scheduler = "batching"
    max_num_seqs: int = Field(default=8, ge=1, le=256, description="sequences a profile runs at once")
    # KV positions of a profile: one pool its sequences share, any one of which may grow to the model's
    # context while the pool has room (a sequence is preempted and recomputed later when it runs out).
    # None: the model's context (llama.cpp allocates it at load; PyTorch caches grow with use up to it).
    # Finished sequences' KV stays in the pool for prompts sharing its prefix until the room is needed.
    kv_cache_tokens: int | None = Field(default=None, ge=16)
    # KV positions that finished sequences may keep in the pool for later prompts sharing their prefix (a
    # system prompt, a conversation's history); past it the least recently used entries go at once. In
    # llama.cpp's unified KV every held cell widens every decode step's attention: 4,800 idle cells took 8
    # decoding rows from 79 to 30 tok/s on the default model. 0 turns the prefix cache off between requests.
    idle_kv_tokens: int = Field(default=2048, ge=0, description="KV positions finished sequences keep for reuse")
    max_queue: int = Field(default=32, ge=0, le=10_000, description="requests waiting for room before 429")
    profiles: dict[str, ServingPolicy] = Field(default_factory=dict)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SHRINKSERVE_", env_nested_delimiter="__", extra="forbid", yaml_file=None
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    cache_dir: Path = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "shrinkserve"
    threads: int = Field(default_factory=default_threads, ge=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Seconds a request for a lazy profile waits while that profile is built and loaded.
    load_timeout_seconds: float = Field(default=900.0, gt=0)
    api_keys: list[str] = Field(default_factory=list, description="accepted bearer tokens; empty = no auth")
    # Bodies over this get 413 before they are read into memory or parsed (a 50 MB body used to stall the server).
    max_request_body_bytes: int = Field(default=8 * 2**20, ge=1024, description="larger request bodies get 413")
    # On SIGTERM: /ready turns 503 and new requests get 503 at once; running generations get this long
    # to finish, then end with finish_reason "abort". The chart's terminationGracePeriodSeconds covers it.
    drain_timeout_seconds: float = Field(default=30.0, ge=0, le=3600)
    # `engine: vllm` profiles run `<vllm_python> -m vllm.entrypoints.openai.api_server` (vLLM in its own venv).
    vllm_python: Path | None = Field(default=None, description="vLLM venv's interpreter; None: .venv-vllm/bin/python")

    bases: dict[str, BaseSpec] = Field(default_factory=lambda: {"smollm2": BaseSpec()})
    profiles: dict[str, ProfileSpec] = Field(default_factory=dict)
    routes: dict[str, str] = Field(default_factory=dict)
    capture: CaptureSettings = Field(default_factory=CaptureSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls), file_secret_settings)

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if not self.bases:
            raise ValueError("at least one base is required")
        if not self.profiles:
            raise ValueError("at least one profile is required")
        first_base = next(iter(self.bases))
        for name, profile in self.profiles.items():
            if not _NAME.match(name):
                raise ValueError(f"profile name {name!r} must match {_NAME.pattern}")
            if profile.base is None:
                profile.base = first_base
            elif profile.base not in self.bases:
                raise ValueError(f"profile {name!r} names unknown base {profile.base!r}")
        normalized: dict[str, str] = {}
        for prefix, profile_name in self.routes.items():
            clean = "/" + prefix.strip("/")
            if clean == "/" or not re.fullmatch(r"(/[A-Za-z0-9._-]+)+", clean):
                raise ValueError(f"route prefix {prefix!r} must look like '/q4' (not '/')")
            if clean.split("/")[1] in {"v1", "metrics", "health", "ready", "tokenize", "detokenize", "tokenizer_info"}:
                raise ValueError(f"route prefix {prefix!r} collides with a built-in endpoint")
            if profile_name not in self.profiles:
                raise ValueError(f"route {prefix!r} names unknown profile {profile_name!r}")
            normalized[clean] = profile_name
        self.routes = normalized
        unknown = [n for n in self.serving.profiles if n not in self.profiles]
        if unknown:
            raise ValueError(f"serving.profiles names unknown profile(s): {', '.join(unknown)}")
        unknown = [n for n in self.capture.profiles if n not in self.profiles]
        if unknown:
            raise ValueError(f"capture.profiles names unknown profile(s): {', '.join(unknown)}")
        return self

    def serving_for(self, name: str) -> ResolvedServing:
        """A profile's serving policy: its override, else its legacy profile keys when set, else the defaults."""
        spec, over, d = self.profiles[name], self.serving.profiles.get(name, ServingPolicy()), self.serving
        legacy = spec.model_fields_set
        return ResolvedServing(
            scheduler=over.scheduler or d.scheduler,
            max_num_seqs=over.max_num_seqs or (spec.max_concurrency if "max_concurrency" in legacy else d.max_num_seqs),
            kv_cache_tokens=over.kv_cache_tokens or d.kv_cache_tokens,
            idle_kv_tokens=over.idle_kv_tokens if over.idle_kv_tokens is not None else d.idle_kv_tokens,
            max_queue=over.max_queue if over.max_queue is not None else (
                spec.max_queue if "max_queue" in legacy else d.max_queue),
        )


class ResolvedServing(BaseModel):
    scheduler: Scheduler
    max_num_seqs: int
    kv_cache_tokens: int | None
    idle_kv_tokens: int = 2048
    max_queue: int


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from env, then the YAML file (argument, else `SHRINKSERVE_CONFIG`, else the shipped default)."""
    path = Path(config or os.environ.get("SHRINKSERVE_CONFIG") or default_config_path()).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    # pydantic-settings would let a YAML syntax error escape as a traceback and turn a non-mapping
    # document into a cryptic "dictionary update sequence" error; say what is wrong with the file instead.
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a YAML mapping (bases:, profiles:, routes:, ...), "
                         f"not a {type(data).__name__}")
    bound = type("BoundSettings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": path}})
    return bound(**overrides)
