"""Runs a profile's evaluation against its base and stores the record; shared by the server and `shrinkserve eval`.

vLLM profiles are scored by the PyTorch engine on the same artifact (`run_artifact`): perplexity, KL, top-1
and tasks need full-vocabulary logprobs, vLLM gives top-k. Their record also keeps `engine_check`: the
PyTorch engine's teacher-forced top-1 on the first held-out tokens, against which the running vLLM server is
checked at every load (`record["vllm"]`, a cheap agreement check; below `evaluation.min_vllm_agreement` the
profile is rejected like a failed gate: vLLM would not be serving what was scored).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import threading
from pathlib import Path
from typing import Any

from shrinkserve.compression import quality_store
from shrinkserve.compression.distill.evaluate import score_on_traffic
from shrinkserve.compression.distill.method import HeldoutTraffic, heldout_traffic
from shrinkserve.compression.profiles import BuiltProfile, ProfileBuilder, ProfileSpec
from shrinkserve.compression.quality import (
    EvalSet,
    Progress,
    Scorer,
    evaluate,
    iter_gate_failures,
    progress_units,
    task_score,
)
from shrinkserve.compression.scoring import chunked_logprobs
from shrinkserve.server.engines.base import CPU, Engine

log = logging.getLogger("shrinkserve.quality")


class EvaluationCancelled(Exception):
    pass


class Evaluator:
    """Keeps the reference (the base in float32 on the PyTorch engine) loaded while evaluations run.

    Prose and tasks compare a profile with its reference base, so every row of the report has one reference.
    A distilled student (and what a `then:` chain made of it) is also scored on the held-out split of its
    own traffic against its teacher (`record["traffic"]`): what it was trained to match."""

    def __init__(self, builder: ProfileBuilder, evalset: EvalSet, threads: int, *,
                 traffic_tokens: int | None = 4096, background: bool = False) -> None:
        self.builder = builder
        # In the server, every forward of an evaluation yields to the requests being served (CpuBudget).
        self.background = background
        self.current: str | None = None  # the profile being evaluated now
        self.evalset = evalset
        self.threads = threads
        self.traffic_tokens = traffic_tokens
        self._reference: tuple[Path, Scorer] | None = None
        self._reference_task_score: dict[Path, float] = {}
        self._lock = threading.RLock()  # one evaluation at a time (CPU-bound); guards the reference too
        self._stop = threading.Event()

    def stored(self, built: BuiltProfile, spec: ProfileSpec) -> dict[str, Any] | None:
        record = quality_store.load(self.builder.cache, spec, key=built.key, path=built.path,
                                    eval_set_sha256=self.evalset.sha256)
        if record is not None and spec.heldout_traffic and self._traffic_stale(record):
            return None
        return record

    def _traffic_stale(self, record: dict[str, Any]) -> bool:
        """Not measured on (this much of) its held-out traffic: measure again. (None: the split was empty.)"""
        if "traffic" not in record:
            return True
        return record["traffic"] is not None and record["traffic"].get("max_tokens", -1) != self.traffic_tokens

    def _heldout(self, name: str) -> HeldoutTraffic | None:
        """The profile's held-out traffic, its first examples up to `traffic_tokens` response tokens."""
        held = heldout_traffic(self.builder, name)
        if held is None or self.traffic_tokens is None:
            return held
        examples, tokens = [], 0
        for ex in held.examples:
            if tokens >= self.traffic_tokens:
                break
            examples.append(ex)
            tokens += ex.n_response
        return dataclasses.replace(held, examples=examples)

    def progress_total(self, name: str, spec: ProfileSpec, engine: Engine) -> int:
        """Progress units of `run` for this profile: held-out prose tokens, task items, held-out traffic tokens."""
        total = progress_units(self.evalset, len(self.evalset.token_ids(engine)))
        held = self._heldout(name) if spec.heldout_traffic else None
        return total + (sum(ex.n_response for ex in held.examples) if held is not None else 0)

    def _reference_for(self, name: str) -> tuple[Path, Scorer]:
        from shrinkserve.server.engines.torch_engine import TorchEngine

        path = self.builder.reference_checkpoint(name)
        if self._reference is None or self._reference[0] != path:
            self.release()
            self._reference = (path, Scorer(TorchEngine(path, threads=self.threads, dtype="float32")))
        return self._reference

    def run(
        self, name: str, built: BuiltProfile, spec: ProfileSpec, engine: Engine, *,
        resident_bytes: int | None = None, progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Measure, store in the artifact's manifest, return the record."""

        def tick(n: int) -> None:
            # Checked after every window and task item, so shutdown never waits long for an evaluation.
            if self._stop.is_set():
                raise EvaluationCancelled(name)
            if progress is not None:
                progress(n)

        with self._lock, (CPU.background() if self.background else contextlib.nullcontext()):
            self.current = name
            try:
                return self._run(name, built, spec, engine, resident_bytes, tick)
            finally:
                self.current = None

    def _run(self, name: str, built: BuiltProfile, spec: ProfileSpec, engine: Engine, resident_bytes: int | None,
             tick: Progress) -> dict[str, Any]:
        if self._stop.is_set():
            raise EvaluationCancelled(name)
        ref_path, reference = self._reference_for(name)
        log.info("evaluating profile %s against %s", name, ref_path)
        if ref_path not in self._reference_task_score:
            self._reference_task_score[ref_path] = task_score(reference, self.evalset.tasks, tick)
        else:
            tick(len(self.evalset.tasks))
        scorer = Scorer(engine)
        try:
            record = evaluate(scorer, reference, self.evalset, progress=tick,
                              reference_task_score=self._reference_task_score[ref_path])
        finally:
            scorer.close()
        if spec.heldout_traffic:
            record["traffic"] = self._traffic(name, engine, tick)
        record.update(bytes=built.bytes, resident_bytes=resident_bytes, method=spec.method,
                      variant=quality_store.variant(spec))
        if spec.engine == "vllm":
            record["scored_by"] = f"torch ({getattr(engine, 'device', 'cpu')}, {spec.dtype})"
            record["engine_check"] = engine_check_reference(engine, self.evalset)
        quality_store.save(self.builder.cache, spec, record, key=built.key, path=built.path)
        log.info("profile %s: ppl %.3f (x%.3f), KL %.4f, top-1 %.3f, tasks %.2f, %.1f tok/s", name,
                 record["perplexity"], record["ppl_ratio"], record["kl"], record["top1"], record["task_score"],
                 record["decode_tokens_per_s"])
        if record.get("traffic"):
            t = record["traffic"]
            log.info("profile %s on %d held-out traffic tokens: KL %.4f (hardest 10%%: %.4f), top-1 %.3f", name,
                     t["tokens"], t["kl"], t["kl_hard10"], t["top1"])
        return record

    def _traffic(self, name: str, engine: Engine, tick: Progress) -> dict[str, Any] | None:
        """KL / top-1 against the student's teacher (float32, PyTorch engine) on the held-out split of the
        traffic it was distilled from; the teacher is the loaded reference when they are the same checkpoint."""
        from shrinkserve.server.engines.torch_engine import TorchEngine

        held = self._heldout(name)
        if held is None or not held.examples:
            return None
        shared = self._reference is not None and self._reference[0] == held.teacher
        teacher = self._reference[1].engine if shared else TorchEngine(held.teacher, threads=self.threads,
                                                                        dtype="float32")
        try:
            score = score_on_traffic(engine, held.examples, teacher=teacher, progress=tick)
        finally:
            if not shared:
                teacher.close()
        return {**score, "teacher_key": held.teacher_identity, "student_key": held.student_key,
                "max_tokens": self.traffic_tokens}

    def run_artifact(self, name: str, built: BuiltProfile, spec: ProfileSpec, *,
                     progress: Progress | None = None) -> dict[str, Any]:
        """Score a profile whose serving engine cannot be scored (vLLM) on the PyTorch engine, loaded for this
        evaluation only and freed afterwards (before the vLLM server starts: the two never hold the model at once)."""
        from shrinkserve.server.engines.loader import load_scoring_engine

        engine = load_scoring_engine(built, spec, self.threads)
        try:
            return self.run(name, built, spec, engine, progress=progress)
        finally:
            engine.close()
            gc.collect()

    def shutdown(self) -> None:
        """Stop a running evaluation (before the engines it uses are closed) and free the reference."""
        self._stop.set()
        with self._lock:
            self.release()

    def release(self) -> None:
        """Free the reference's memory (about 540 MB for the default model) once no evaluation uses it."""
        with self._lock:
            if self._reference is not None:
                self._reference[1].engine.close()
                self._reference = None
                gc.collect()


ENGINE_CHECK_TOKENS = 256


def engine_check_reference(engine: Engine, evalset: EvalSet, n: int = ENGINE_CHECK_TOKENS) -> dict[str, Any]:
    """The scoring engine's teacher-forced top-1 on the first `n` held-out tokens: what a vLLM server serving the
    same artifact must reproduce (its prompt logprobs' rank-1 tokens)."""
    ids = engine.tokenize(evalset.text, add_special=False)[:n]
    seq = engine.new_sequence()
    try:
        top1 = [int(i) for i in chunked_logprobs(seq, ids, engine.max_batch).argmax(axis=1)]
    finally:
        seq.close()
    return {"token_ids": ids, "top1": top1}


def gate_failures(record: dict[str, Any] | None, spec: ProfileSpec) -> list[str]:
    failures = []
    check = (record or {}).get("vllm")
    if check and check.get("top1_agreement") is not None and check["top1_agreement"] < check["min_agreement"]:
        # Not a gate the operator set: the scored record would not describe what vLLM serves.
        failures.append(f"vLLM's top-1 agreement with the PyTorch engine on the same artifact "
                        f"{check['top1_agreement']:.4g} is below the minimum {check['min_agreement']:g} "
                        f"(evaluation.min_vllm_agreement): vLLM does not serve what was scored")
    if spec.gate is None or record is None:
        return failures
    return failures + list(iter_gate_failures(record, spec.gate))
