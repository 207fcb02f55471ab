"""Profiles at run time: build → load → ready, a bounded pool of slots and a bounded wait queue each."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.profiles import BuiltProfile, ProfileBuilder, ProfileSpec
from shrinkserve.server.engines.base import Engine, Sequence
from shrinkserve.server.errors import APIError, not_ready
from shrinkserve.server.metrics import Metrics
from shrinkserve.server.quality_runner import EvaluationCancelled, Evaluator, gate_failures
from shrinkserve.server.settings import Settings

log = logging.getLogger("shrinkserve.registry")

State = Literal["pending", "building", "loading", "evaluating", "ready", "rejected", "failed"]


def process_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_engine(built: BuiltProfile, spec: ProfileSpec, threads: int) -> Engine:
    if built.engine == "llamacpp":
        from shrinkserve.server.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(built.path, threads=spec.threads or threads, context_length=spec.context_length)
    from shrinkserve.server.engines.torch_engine import TorchEngine

    return TorchEngine(built.path, threads=spec.threads or threads, dtype=spec.dtype,
                       context_length=spec.context_length)


@dataclass
class ProfileRuntime:
    name: str
    spec: ProfileSpec
    state: State = "pending"
    error: str | None = None
    built: BuiltProfile | None = None
    engine: Engine | None = None
    resident_bytes: int | None = None
    routes: list[str] = field(default_factory=list)
    quality: dict | None = None  # the evaluation record for the current eval set, once measured
    waiting: int = 0
    running: int = 0
    _slots: asyncio.Queue[Sequence] | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    @property
    def gate_failures(self) -> list[str]:
        return gate_failures(self.quality, self.spec)

    def check_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "failed":
            raise not_ready(self.name, f"failed to build or load: {self.error}")
        if self.state == "rejected":
            raise APIError(503, f"profile {self.name!r} is not served: it failed its quality gate: "
                                f"{'; '.join(self.gate_failures)}", code="quality_gate_failed")
        raise not_ready(self.name, f"{self.state}")


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.cache = ArtifactCache(settings.cache_dir)
        self.builder = ProfileBuilder(
            self.cache, settings.bases, settings.profiles, threads=settings.threads,
            on_cache_event=lambda profile, result: metrics.cache_events.labels(profile, result).inc(),
        )
        self.profiles = {name: ProfileRuntime(name, spec) for name, spec in settings.profiles.items()}
        for prefix, name in settings.routes.items():
            self.profiles[name].routes.append(prefix)
        for name in self.profiles:
            metrics.declare(name)
        self.evaluator = Evaluator(self.builder, settings.evaluation.evalset(), settings.threads)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Loading is measured by RSS deltas, so loads must not overlap.
        self._load_lock = threading.Lock()
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin building and loading every eager profile, one after another, off the event loop."""
        self._loop = loop
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
        if rt.state != "ready" or rt.engine is None or rt.built is None:
            return
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
            rt.state = "rejected"
            self.metrics.profile_ready.labels(rt.name).set(0)

    def _load(self, rt: ProfileRuntime) -> None:
        with self._load_lock:
            if rt.state in ("ready", "failed", "rejected") or self._closed:
                return
            try:
                rt.state = "building"
                built = self.builder.build(rt.name)
                rt.built = built
                self.metrics.build_seconds.labels(rt.name).observe(built.build_seconds)
                self.metrics.artifact_bytes.labels(rt.name).set(built.bytes)
                rt.state = "loading"
                before = process_rss()
                engine = load_engine(built, rt.spec, self.settings.threads)
                seqs = [engine.new_sequence() for _ in range(rt.spec.max_concurrency)]
                seqs[0].forward(engine.tokenize("Hello")[:1] or [0], all_logits=False)  # touch every weight
                seqs[0].reset()
                rt.resident_bytes = max(0, process_rss() - before)
                self.metrics.resident_bytes.labels(rt.name).set(rt.resident_bytes)
                rt.engine = engine
                assert self._loop is not None
                fut = asyncio.run_coroutine_threadsafe(self._make_slots(rt, seqs), self._loop)
                fut.result()
                record = self.evaluator.stored(built, rt.spec)
                if record is None and rt.spec.gate is not None:
                    # A gated profile is measured before it serves a single request.
                    rt.state = "evaluating"
                    record = self.evaluator.run(rt.name, built, rt.spec, engine, resident_bytes=rt.resident_bytes)
                if record is not None:
                    self._apply_quality(rt, record)
                if rt.state != "rejected":
                    rt.state = "ready"
                    self.metrics.profile_ready.labels(rt.name).set(1)
                log.info("profile %s ready: %s, %d bytes on disk, +%d MiB RSS, %s", rt.name, built.method,
                         built.bytes, rt.resident_bytes >> 20, "cache hit" if built.cache_hit else "built")
            except Exception as exc:  # a broken profile must not take the others down
                log.exception("profile %s failed", rt.name)
                rt.state, rt.error = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                rt._ready.set()

    @staticmethod
    async def _make_slots(rt: ProfileRuntime, seqs: list[Sequence]) -> None:
        q: asyncio.Queue[Sequence] = asyncio.Queue()
        for s in seqs:
            q.put_nowait(s)
        rt._slots = q

    def close(self) -> None:
        self._closed = True
        self.evaluator.shutdown()
        for rt in self.profiles.values():
            if rt.engine is not None:
                rt.engine.close()
                rt.engine = None
            rt.state = "pending" if rt.state == "ready" else rt.state

    # ---------------------------------------------------------------- requests

    def get(self, name: str) -> ProfileRuntime:
        rt = self.profiles.get(name)
        if rt is None:
            raise APIError(404, f"the model {name!r} does not exist; see GET /v1/models", param="model",
                           code="model_not_found")
        return rt

    async def ensure_ready(self, rt: ProfileRuntime) -> None:
        """Lazy profiles are built and loaded on first use (the request waits); eager ones answer 503 until ready."""
        if rt.state == "ready":
            return
        if rt.spec.load == "lazy" and rt.state in ("pending", "building", "loading", "evaluating"):
            if rt.state == "pending":
                threading.Thread(target=self._load_and_evaluate, args=(rt,), name=f"load-{rt.name}",
                                 daemon=True).start()
            waited = await asyncio.to_thread(rt._ready.wait, self.settings.load_timeout_seconds)
            if not waited:
                raise not_ready(rt.name, f"still {rt.state} after {self.settings.load_timeout_seconds:.0f}s")
        rt.check_ready()

    def check_capacity(self, rt: ProfileRuntime) -> None:
        """503 now if a request would find the profile's wait queue full."""
        assert rt._slots is not None and rt.engine is not None
        if rt._slots.empty() and rt.waiting >= rt.spec.max_queue:
            raise APIError(503, f"profile {rt.name!r} is at capacity ({rt.spec.max_concurrency} running, "
                                f"{rt.waiting} waiting); retry later", code="server_busy",
                           headers={"Retry-After": "1"})

    async def acquire(self, rt: ProfileRuntime) -> Sequence:
        """A free slot of the profile (waiting in its queue); 503 when the queue is full.

        The caller must hand the slot back with `release` once the thread using it has finished.
        """
        self.check_capacity(rt)
        assert rt._slots is not None
        rt.waiting += 1
        self.metrics.waiting.labels(rt.name).set(rt.waiting)
        t0 = time.perf_counter()
        try:
            seq = await rt._slots.get()
        finally:
            rt.waiting -= 1
            self.metrics.waiting.labels(rt.name).set(rt.waiting)
        self.metrics.queue_time.labels(rt.name).observe(time.perf_counter() - t0)
        rt.running += 1
        self.metrics.running.labels(rt.name).set(rt.running)
        return seq

    def release(self, rt: ProfileRuntime, seq: Sequence) -> None:
        """Return a slot; safe to call from any thread."""

        def put_back() -> None:
            rt.running -= 1
            self.metrics.running.labels(rt.name).set(rt.running)
            assert rt._slots is not None
            rt._slots.put_nowait(seq)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(put_back)

    @property
    def ready(self) -> bool:
        # A rejected profile is a decision, not a fault: the pod still serves the others.
        return all(rt.state in ("ready", "rejected") for rt in self.profiles.values() if rt.spec.load == "eager")
