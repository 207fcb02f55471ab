"""Profiles at run time: build → load → (evaluate) → ready, each served by its own core.

`ProfileRuntime` is one profile's state machine; `Registry` maps names to runtimes, loads eager
profiles at start and lazy ones on first use, applies quality gates, drains and closes every core.
Admission, scheduling and KV slots belong to the cores (runtime/batching.py), not to the registry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

from shrinkserve.compression import quality_store
from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.profiles import BuiltProfile, ProfileBuilder, ProfileSpec
from shrinkserve.compression.quality import SPEED_PROMPT
from shrinkserve.compression.spec import VllmOptions
from shrinkserve.server.engines.base import CPU, Engine, Tokenizer
from shrinkserve.server.engines.loader import load_engine
from shrinkserve.server.quality_runner import EvaluationCancelled, Evaluator, gate_failures
from shrinkserve.server.runtime.batching import BatchingCore
from shrinkserve.server.runtime.capture import CaptureQueue
from shrinkserve.server.runtime.core import EngineCore
from shrinkserve.server.runtime.metrics import Metrics
from shrinkserve.server.runtime.types import CoreStats
from shrinkserve.server.settings import ResolvedServing, Settings

log = logging.getLogger("shrinkserve.registry")

State = Literal["pending", "building", "loading", "evaluating", "ready", "rejected", "failed"]
# Which state may follow which. Every change goes through `ProfileRuntime.move`, under the profile's lock: the
# loader thread, a vLLM child's watch thread, the event loop (lazy loads) and shutdown all change states.
TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"building", "failed"}),
    "building": frozenset({"loading", "failed"}),
    "loading": frozenset({"evaluating", "ready", "rejected", "failed"}),
    "evaluating": frozenset({"loading", "ready", "rejected", "failed"}),
    "ready": frozenset({"rejected", "failed", "pending"}),  # pending: shut down, the engine is gone
    "rejected": frozenset(),
    "failed": frozenset(),
}


def process_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class NotServed(Exception):
    """A profile cannot serve now; `code` is profile_not_ready or quality_gate_failed (both 503)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class UnknownProfile(KeyError):
    pass


@dataclass
class ProfileRuntime:
    name: str
    spec: ProfileSpec
    serving: ResolvedServing
    state: State = "pending"
    error: str | None = None
    built: BuiltProfile | None = None
    # Its tokenizer side serves /tokenize; the core drives its weights. For a vLLM profile only the tokenizer
    # (the weights live in the child server).
    engine: Engine | Tokenizer | None = None
    core: EngineCore | None = None
    resident_bytes: int | None = None
    routes: list[str] = field(default_factory=list)
    quality: dict | None = None  # the evaluation record for the current eval set, once measured
    ready_event: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def move(self, to: State, *, only_from: Collection[str] | None = None, error: str | None = None) -> bool:
        """Change the state if `to` may follow the current one (and it is in `only_from`, when given): one
        atomic check-and-set, so two threads never both start a load or undo each other's end state."""
        with self._lock:
            if (only_from is not None and self.state not in only_from) or to not in TRANSITIONS[self.state]:
                return False
            self.state = to
            if error is not None:
                self.error = error
            return True

    @property
    def gate_failures(self) -> list[str]:
        return gate_failures(self.quality, self.spec)

    def check_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "failed":
            raise NotServed(f"profile {self.name!r} is not ready: failed to build or load: {self.error}",
                            "profile_not_ready")
        if self.state == "rejected":
            raise NotServed(f"profile {self.name!r} is not served: it failed its quality gate: "
                            f"{'; '.join(self.gate_failures)}", "quality_gate_failed")
        raise NotServed(f"profile {self.name!r} is not ready: {self.state}", "profile_not_ready")


def vllm_options(rt: ProfileRuntime, settings: Settings) -> VllmOptions:
    """The options a vLLM profile's child starts with: its `vllm:` block, the rest from the profile (dtype,
    context_length), its serving policy (max_num_seqs: vLLM batches exactly what our admission lets run),
    the settings (the venv, the capture's top-k that --max-logprobs must cover)."""
    spec, s = rt.spec, rt.serving
    v = spec.vllm or VllmOptions()
    seqs = 1 if s.scheduler == "serial" else (v.max_num_seqs or s.max_num_seqs)
    return v.model_copy(update={
        "max_num_seqs": seqs, "dtype": v.dtype or spec.dtype, "max_model_len": v.max_model_len or spec.context_length,
        "python": v.python or settings.vllm_python, "max_logprobs": max(v.max_logprobs, settings.capture.top_k)})


def make_core(rt: ProfileRuntime, engine: Engine, metrics: Metrics, capture: CaptureQueue) -> BatchingCore:
    """The profile's core, sized by its serving policy: `max_num_seqs` sequences at once over one KV pool
    of `kv_cache_tokens` positions (default: the model's context), any one of which may grow to the
    model's whole context while the pool has room.
    """
    s = rt.serving
    seqs = 1 if s.scheduler == "serial" else s.max_num_seqs
    ctx = engine.context_length
    observer = capture.observer(rt.name, engine, rt.built)
    return BatchingCore(
        rt.name, engine, max_seqs=seqs, slot_capacity=ctx, kv_tokens=s.kv_cache_tokens or ctx,
        idle_kv_tokens=s.idle_kv_tokens, max_queue=s.max_queue, observers=[observer] if observer else [],
        on_queue_time=metrics.queue_time.labels(rt.name).observe,
    )


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        CPU.configure(settings.threads)
        self.cache = ArtifactCache(settings.cache_dir)
        self.builder = ProfileBuilder(
            self.cache, settings.bases, settings.profiles, threads=settings.threads,
            on_cache_event=lambda profile, result: metrics.cache_events.labels(profile, result).inc(),
        )
        self.profiles = {name: ProfileRuntime(name, spec, settings.serving_for(name))
                         for name, spec in settings.profiles.items()}
        for prefix, name in settings.routes.items():
            self.profiles[name].routes.append(prefix)
        for name in self.profiles:
            metrics.declare(name)
        metrics.core_gauges.source = self.stats
        self.capture = CaptureQueue(settings.capture, settings.profiles)
        self.evaluator = Evaluator(self.builder, settings.evaluation.evalset(), settings.threads,
                                   traffic_tokens=settings.evaluation.traffic_tokens, background=True)
        CPU.busy = self.serving_busy  # evaluations run their forwards only while no request is in flight
        # vLLM children's own metrics, re-exported with the profile label (one relay for all of them).
        self.vllm_relay = None
        if any(p.engine == "vllm" for p in settings.profiles.values()):
            from shrinkserve.server.engines.vllm_metrics import VllmMetricsRelay

            self.vllm_relay = VllmMetricsRelay()
            metrics.registry.register(self.vllm_relay)
        self._vllm_starting: dict[str, object] = {}  # name → VllmProcess not yet handed to a core (close() stops it)
        self._gpus = None  # GpuPool of the vLLM children on CUDA, made at the first one
        # Loading is measured by RSS deltas, so loads must not overlap.
        self._load_lock = threading.Lock()
        self._closed = False

    def serving_busy(self) -> bool:
        """Any request admitted or queued on any profile (read from other threads: a heuristic, no lock)."""
        for rt in list(self.profiles.values()):
            admission = getattr(rt.core, "admission", None)
            if admission is not None and (admission.seqs_held or admission.waiting):
                return True
        return False

    def quality_status(self, rt: ProfileRuntime) -> str:
        """measured | evaluating | pending (will be measured once loaded and the cores leave room) | off."""
        if rt.quality is not None:
            return "measured"
        if self.evaluator.current == rt.name:
            return "evaluating"
        if self.settings.evaluation.on_build and rt.state in ("pending", "building", "loading", "evaluating", "ready"):
            return "pending"
        return "off"

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Begin building and loading every eager profile, one after another, off the event loop."""
        eager = [p for p in self.profiles.values() if p.spec.load == "eager"]
        if eager:
            threading.Thread(target=self._load_all, args=(eager,), name="profile-loader", daemon=True).start()

    def _load_all(self, runtimes: list[ProfileRuntime]) -> None:
        for rt in runtimes:
            if self._closed:
                return
            self._load(rt)
        # Profiles without a gate serve first and are measured afterwards, so start-up stays quick.
        for rt in runtimes:
            self._evaluate_if_missing(rt)
        self.evaluator.release()

    def _load_and_evaluate(self, rt: ProfileRuntime) -> None:
        self._load(rt)
        self._evaluate_if_missing(rt)
        self.evaluator.release()

    def _evaluate_if_missing(self, rt: ProfileRuntime) -> None:
        if self._closed or not self.settings.evaluation.on_build or rt.quality is not None:
            return
        if rt.state != "ready" or not isinstance(rt.engine, Engine) or rt.built is None:
            return  # (vLLM profiles are scored while they load, before their server starts)
        try:
            record = self.evaluator.run(rt.name, rt.built, rt.spec, rt.engine, resident_bytes=rt.resident_bytes)
        except EvaluationCancelled:
            return
        except Exception:  # a failed measurement leaves the profile serving, unmeasured
            log.exception("evaluating profile %s failed", rt.name)
            return
        self._apply_quality(rt, record)

    def _apply_quality(self, rt: ProfileRuntime, record: dict | None) -> None:
        """Publish the record; a profile failing its gate stops serving unless the operator overrides."""
        rt.quality = record
        failures = rt.gate_failures
        self.metrics.set_quality(rt.name, record, rejected=bool(failures))
        if failures and not self.settings.evaluation.serve_rejected:
            log.warning("profile %s rejected by its quality gate: %s", rt.name, "; ".join(failures))
            if rt.move("rejected"):
                self.metrics.profile_ready.labels(rt.name).set(0)

    def _load(self, rt: ProfileRuntime) -> None:
        with self._load_lock:
            # A lazy profile was claimed (moved to building) by the request that found it pending.
            if self._closed or (rt.state != "building" and not rt.move("building", only_from={"pending"})):
                return
            try:
                built = self.builder.build(rt.name)
                rt.built = built
                self.metrics.build_seconds.labels(rt.name).observe(built.build_seconds)
                self.metrics.artifact_bytes.labels(rt.name).set(built.bytes)
                rt.move("loading")
                if rt.spec.engine == "vllm":
                    record = self._load_vllm(rt, built)
                    if rt.core is None:  # shut down while it started
                        return
                else:
                    before = process_rss()
                    engine = load_engine(built, rt.spec, self.settings.threads)
                    core = make_core(rt, engine, self.metrics, self.capture)
                    if self._closed:  # shut down while loading: nobody else would stop this core
                        core.close()
                        return
                    rt.resident_bytes = max(0, process_rss() - before)
                    self.metrics.resident_bytes.labels(rt.name).set(rt.resident_bytes)
                    rt.engine, rt.core = engine, core
                    record = self.evaluator.stored(built, rt.spec)
                    if record is None and rt.spec.gate is not None:
                        # A gated profile is measured before it serves a single request.
                        rt.move("evaluating")
                        record = self.evaluator.run(rt.name, built, rt.spec, engine,
                                                    resident_bytes=rt.resident_bytes)
                if record is not None:
                    self._apply_quality(rt, record)
                if rt.move("ready", only_from={"loading", "evaluating"}):
                    self.metrics.profile_ready.labels(rt.name).set(1)
                log.info("profile %s ready: %s, %d bytes on disk, +%d MiB RSS, %s, %s", rt.name, built.method,
                         built.bytes, (rt.resident_bytes or 0) >> 20, _describe(rt.core),
                         "cache hit" if built.cache_hit else "built")
            except Exception as exc:  # a broken profile must not take the others down
                log.exception("profile %s failed", rt.name)
                rt.move("failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                rt.ready_event.set()

    def _load_vllm(self, rt: ProfileRuntime, built: BuiltProfile) -> dict | None:
        """Score the artifact on the PyTorch engine if it has no record (before the child starts: the two never
        hold the model at once), start the child and wait for it, make the core, then check the child against
        the scored artifact (top-1 agreement) and measure its decode speed. Returns the quality record."""
        from shrinkserve.server.engines.device import GpuPool, probe_cuda, select_device
        from shrinkserve.server.engines.hf_tokenizer import HfTokenizer
        from shrinkserve.server.engines.vllm_process import VllmProcess
        from shrinkserve.server.runtime.vllm_core import VllmCore

        spec = rt.spec
        device = select_device(spec.device, spec.dtype, "dense", probe_cuda()).device
        if device == "cpu" and (why := spec.vllm_8bit_weights()):
            raise ValueError(f"{why}: this profile would run on vLLM-CPU, which has no 8-bit weight-only kernel; "
                             "use lm_head_bits: null or 4, a 4-bit method, or a GPU")
        record = self.evaluator.stored(built, spec)
        if record is None and (spec.gate is not None or self.settings.evaluation.on_build):
            rt.move("evaluating")
            record = self.evaluator.run_artifact(rt.name, built, spec)
            self.evaluator.release()  # the float32 reference goes before vLLM takes its memory
        rt.move("loading")
        opts = vllm_options(rt, self.settings)
        tokenizer = HfTokenizer(built.path, context_length=opts.max_model_len, name="vllm")
        opts = opts.model_copy(update={"max_model_len": tokenizer.context_length})
        if device.startswith("cuda"):
            # The CPU-only variables would only confuse a reader of the child's environment; each child gets GPUs
            # of its own unless the profile placed it explicitly.
            update: dict = {"cpu_kvcache_space_gib": None}
            if "CUDA_VISIBLE_DEVICES" not in opts.env:
                if self._gpus is None:
                    self._gpus = GpuPool.of_process(probe_cuda().device_count)
                update["env"] = {**opts.env,
                                 "CUDA_VISIBLE_DEVICES": self._gpus.take(opts.tensor_parallel_size, rt.name)}
            opts = opts.model_copy(update=update)
        log_path = self.settings.cache_dir / "logs" / f"vllm-{rt.name}.log"
        process = VllmProcess(built.path, rt.name, opts, log_path=log_path)
        self._vllm_starting[rt.name] = process
        try:
            process.start()
            process.wait_ready()
        finally:
            self._vllm_starting.pop(rt.name, None)
        if self._closed:
            process.stop()
            return None
        s = rt.serving
        seqs = opts.max_num_seqs or s.max_num_seqs

        def failed(message: str) -> None:
            if rt.move("failed", error=f"vLLM server: {message}"):
                self.metrics.profile_ready.labels(rt.name).set(0)

        try:
            observer = self.capture.observer(rt.name, tokenizer, built)
            core = VllmCore(rt.name, tokenizer, process, max_seqs=seqs, context_length=tokenizer.context_length,
                            kv_tokens=s.kv_cache_tokens or seqs * tokenizer.context_length, max_queue=s.max_queue,
                            observers=[observer] if observer else [],
                            on_queue_time=self.metrics.queue_time.labels(rt.name).observe,
                            max_restarts=opts.max_restarts, on_failed=failed)
        except BaseException:
            process.stop()  # a profile that failed to load leaves no child behind
            raise
        rt.engine, rt.core = tokenizer, core
        rt.resident_bytes = process.rss_bytes()  # the child's whole process tree (API server, engine, workers)
        self.metrics.resident_bytes.labels(rt.name).set(rt.resident_bytes)
        if self.vllm_relay is not None:
            self.vllm_relay.add(rt.name, process.endpoint)
        log.info("profile %s: vLLM server ready after %.1f s (%s, %s)", rt.name, process.ready_seconds or 0.0,
                 device, process.base_url)
        if record is not None and record.get("engine_check"):
            check = record["engine_check"]
            started = time.perf_counter()
            agreement = core.agreement(check["token_ids"], check["top1"])
            speed = core.decode_speed(tokenizer.tokenize(SPEED_PROMPT, add_special=True))
            record = {**record, "decode_tokens_per_s": speed,
                      "scoring_decode_tokens_per_s": record.get("scoring_decode_tokens_per_s",
                                                                record["decode_tokens_per_s"]),
                      "vllm": {"top1_agreement": agreement, "positions": len(check["top1"]),
                               "min_agreement": self.settings.evaluation.min_vllm_agreement, "device": device,
                               "startup_seconds": process.ready_seconds,
                               "check_seconds": round(time.perf_counter() - started, 1)}}
            quality_store.save(self.cache, spec, record, key=built.key, path=built.path)
            log.info("profile %s: vLLM top-1 agreement with the PyTorch engine %.3f over %d positions, "
                     "%.1f tok/s single stream", rt.name, agreement, len(check["top1"]), speed)
        return record

    async def drain(self, deadline: float) -> None:
        """Every core stops admitting, finishes what runs until `deadline`, then aborts the rest."""
        cores = [rt.core for rt in self.profiles.values() if rt.core is not None]
        await asyncio.gather(*(core.drain(deadline) for core in cores))

    def close(self) -> None:
        """Evaluations stop first (they use the engines), then each core joins its thread and frees its engine."""
        self._closed = True
        self.evaluator.shutdown()
        for process in list(self._vllm_starting.values()):
            process.stop()  # type: ignore[attr-defined]  # a child still starting: its loader sees _closed
        for rt in self.profiles.values():
            if self.vllm_relay is not None:
                self.vllm_relay.remove(rt.name)
            core, rt.core, rt.engine = rt.core, None, None
            if core is not None:
                core.close()
            rt.move("pending", only_from={"ready"})
        self.capture.close()

    # ---------------------------------------------------------------- requests

    def get(self, name: str) -> ProfileRuntime:
        rt = self.profiles.get(name)
        if rt is None:
            raise UnknownProfile(name)
        return rt

    async def ensure_ready(self, rt: ProfileRuntime) -> None:
        """Lazy profiles are built and loaded on first use (the request waits); eager ones answer 503 until ready."""
        if rt.state == "ready":
            return
        if rt.spec.load == "lazy" and rt.state in ("pending", "building", "loading", "evaluating"):
            if not self._closed and rt.move("building", only_from={"pending"}):  # exactly one request starts it
                threading.Thread(target=self._load_and_evaluate, args=(rt,), name=f"load-{rt.name}",
                                 daemon=True).start()
            waited = await asyncio.to_thread(rt.ready_event.wait, self.settings.load_timeout_seconds)
            if not waited:
                raise NotServed(f"profile {rt.name!r} is not ready: still {rt.state} after "
                                f"{self.settings.load_timeout_seconds:.0f}s", "profile_not_ready")
        rt.check_ready()

    def stats(self) -> dict[str, CoreStats | None]:
        return {name: (rt.core.stats() if rt.core is not None else None) for name, rt in self.profiles.items()}

    @property
    def ready(self) -> bool:
        # A rejected profile is a decision, not a fault: the pod still serves the others.
        return all(rt.state in ("ready", "rejected") for rt in self.profiles.values() if rt.spec.load == "eager")


def _describe(core: EngineCore | None) -> str:
    if core is None:
        return "no core"
    s = core.stats()
    mode = "serial" if s.max_seqs == 1 else f"batching {s.max_seqs} sequences"
    return f"{mode} of up to {core.context_length} tokens, {s.kv_total_tokens} KV tokens"
