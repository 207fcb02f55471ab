"""Quality against the base: evaluation records, the gate, `shrinkserve eval` and `shrinkserve report`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.profiles import BaseSpec, ProfileBuilder, ProfileSpec
from shrinkserve.compression.quality import EvalSet, Scorer, choice_logprobs, task_prompt
from shrinkserve.server.engines.loader import load_engine
from tests.conftest import SHRINKSERVE, ServerProcess

EVAL = {"max_tokens": 256, "tasks": 12}
CONFIG = {
    "profiles": {
        # the base checkpoint exactly as the reference runs it: must agree with itself perfectly
        "base-f32": {"method": "hf", "dtype": "float32",
                     "gate": {"max_kl": 1e-6, "min_top1_agreement": 0.999, "max_ppl_increase": 1e-6}},
        # deliberately broken: 2-bit quantization of a 135M model
        "q2_k": {"method": "gguf:q2_k", "gate": {"max_ppl_increase": 0.1, "min_top1_agreement": 0.9}},
        "q8_0": {"method": "gguf:q8_0"},  # no gate: serves at once, measured afterwards
    },
    "routes": {"/q2": "q2_k"},
    "evaluation": {"on_build": True, **EVAL},
}


def metric_samples(url: str, name: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def chat(url: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


@pytest.mark.slow
def test_gate_rejects_a_broken_profile_and_serves_the_rest(cache_dir: Path, tmp_path: Path) -> None:
    proc = ServerProcess(CONFIG, cache_dir, tmp_path / "server.log")
    try:
        ready = proc.wait_ready(timeout=900).json()
        assert ready["profiles"]["q2_k"]["state"] == "rejected"
        assert ready["profiles"]["base-f32"]["state"] == "ready"

        r = chat(proc.url, "q2_k")
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "quality_gate_failed"
        assert "top-1 agreement" in err["message"] and "min_top1_agreement" in err["message"]
        assert httpx.post(proc.url + "/q2/v1/completions", json={"model": "x", "prompt": "a", "max_tokens": 1},
                          timeout=60).status_code == 503
        assert chat(proc.url, "base-f32").status_code == 200
        assert chat(proc.url, "q8_0").status_code == 200

        cards = {c["id"]: c for c in httpx.get(proc.url + "/v1/models").json()["data"]}
        base, broken = cards["base-f32"]["quality"], cards["q2_k"]["quality"]
        assert base["kl"] < 1e-6 and base["top1"] == 1.0 and base["top1_hard10"] == 1.0
        assert base["perplexity"] == pytest.approx(base["reference_perplexity"], rel=1e-9)
        assert base["task_score"] == base["reference_task_score"]
        assert broken["kl"] > 0.05 and broken["top1"] < 0.9 and broken["ppl_ratio"] > 1.1
        assert broken["kl_hard10"] > broken["kl"] and broken["top1_hard10"] < broken["top1"]  # hard cases break first
        assert cards["q2_k"]["state"] == "rejected" and cards["q2_k"]["gate"]["passed"] is False
        assert cards["base-f32"]["gate"]["passed"] is True

        assert cards["base-f32"]["quality_status"] == cards["q2_k"]["quality_status"] == "measured"
        # q8_0 has no gate: it was ready at once and is measured in the background
        assert cards["q8_0"]["quality_status"] in ("pending", "evaluating", "measured")
        assert (cards["q8_0"]["quality"] is None) == (cards["q8_0"]["quality_status"] != "measured")
        deadline = time.monotonic() + 600
        while cards["q8_0"]["quality"] is None and time.monotonic() < deadline:
            time.sleep(2)
            cards = {c["id"]: c for c in httpx.get(proc.url + "/v1/models").json()["data"]}
        q8 = cards["q8_0"]["quality"]
        assert q8 is not None and cards["q8_0"]["quality_status"] == "measured", proc.log()
        assert q8["kl"] < broken["kl"] / 5 and q8["top1"] > broken["top1"] and q8["ppl_ratio"] < 1.05

        kl = metric_samples(proc.url, "shrinkserve_quality_kl_divergence")
        assert kl[(("positions", "all"), ("profile", "q2_k"))] == pytest.approx(broken["kl"])
        assert kl[(("positions", "all"), ("profile", "q8_0"))] == pytest.approx(q8["kl"])
        rejected = metric_samples(proc.url, "shrinkserve_profile_rejected")
        assert rejected[(("profile", "q2_k"),)] == 1 and rejected[(("profile", "q8_0"),)] == 0
        assert metric_samples(proc.url, "shrinkserve_decode_tokens_per_second")[(("profile", "q2_k"),)] > 0
    finally:
        assert proc.stop() in (0, -signal.SIGTERM), proc.log()

    # The records live in the artifacts' manifests, with the eval set's hash and tool versions.
    evalset = EvalSet.load(**EVAL)
    records = {}
    for manifest in (cache_dir / "artifacts").glob("*/manifest.json"):
        for variant, rec in (json.loads(manifest.read_text()).get("quality") or {}).items():
            if rec["eval_set_sha256"] == evalset.sha256:
                records[(json.loads(manifest.read_text())["name"], variant)] = rec
    assert records[("smollm2/q2_k", "llamacpp")]["ppl_ratio"] == pytest.approx(broken["ppl_ratio"])
    assert records[("smollm2/base-hf", "torch:float32")]["kl"] < 1e-6
    assert {"torch", "llama_cpp_python"} <= set(records[("smollm2/q2_k", "llamacpp")]["tools"])

    # An operator can serve it anyway; the stored record is reused, nothing is measured again.
    proc = ServerProcess(CONFIG, cache_dir, tmp_path / "override.log",
                         env={"SHRINKSERVE_EVALUATION__SERVE_REJECTED": "1"})
    try:
        proc.wait_ready(timeout=300)
        assert chat(proc.url, "q2_k").status_code == 200
        card = httpx.get(proc.url + "/v1/models/q2_k").json()
        assert card["state"] == "ready" and card["gate"]["served_anyway"] is True and card["gate"]["failures"]
        assert "evaluating profile" not in proc.log_path.read_text()
    finally:
        assert proc.stop() in (0, -signal.SIGTERM), proc.log()


def test_choice_scoring_with_shared_prefix_matches_full_prompts(cache_dir: Path) -> None:
    """The task scorer reuses the context's KV cache across choices; it must equal scoring each whole prompt."""
    specs = {"q8_0": ProfileSpec(method="gguf:q8_0"), "f32": ProfileSpec(method="hf", dtype="float32")}
    builder = ProfileBuilder(ArtifactCache(cache_dir), {"smollm2": BaseSpec()}, specs, threads=2)
    item = EvalSet.load(tasks=1).tasks[0]
    context, choices = task_prompt(item)
    for name, spec in specs.items():
        engine = load_engine(builder.build(name), spec, 2)
        try:
            scorer = Scorer(engine)
            fast = choice_logprobs(scorer, context, choices)
            ctx = engine.tokenize(context)
            full = []
            for c in choices:
                whole = engine.tokenize(context + c)
                assert whole[: len(ctx)] == ctx
                lp = scorer.logprobs(whole)
                full.append(float(lp[np.arange(len(ctx) - 1, len(whole) - 1), whole[len(ctx):]].sum()))
            assert fast == pytest.approx(full, abs=2e-3), name
            assert int(np.argmax(fast)) == item["answer"], name  # the base knows the capital of France
        finally:
            engine.close()


def test_eval_and_report_commands(cache_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "profiles": {"q4_0": {"method": "gguf:q4_0", "gate": {"min_top1_agreement": 0.5}},
                     "q4_k_m": {"method": "gguf:q4_k_m"}, "not-built": {"method": "gguf:q3_k_s"}},
        "evaluation": {"max_tokens": 128, "tasks": 8},
    }))
    env = {**os.environ, "SHRINKSERVE_CACHE_DIR": str(cache_dir)}
    run = subprocess.run([*SHRINKSERVE, "eval", "--config", str(config), "--profile", "q4_0", "--json"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["profile"] == "q4_0" and record["tokens"] == 127 and record["tasks"] == 8
    assert 0 < record["kl"] < 1 and record["gate_failures"] == []
    assert "eval q4_0" in run.stderr  # the progress bar

    png = tmp_path / "plots" / "frontier.png"
    rep = subprocess.run([*SHRINKSERVE, "report", "--config", str(config), "--out", str(png)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert rep.returncode == 0, rep.stderr
    lines = {line.split("|")[1].strip(): line for line in rep.stdout.splitlines() if line.startswith("| ")}
    assert "pass" in lines["q4_0"] and f"{record['kl']:.4f}" in lines["q4_0"]
    assert "not built" in lines["not-built"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 800 and height > 600


def test_shutdown_during_an_evaluation_is_clean(tmp_path: Path, cache_dir: Path) -> None:
    """SIGTERM while a profile is being measured: the evaluation stops, engines close after it, exit is clean."""
    config = {"profiles": {"q8_0": {"method": "gguf:q8_0"}}, "evaluation": {"on_build": True}}
    proc = ServerProcess(config, cache_dir, tmp_path / "server.log")
    try:
        proc.wait_ready(timeout=600)
        deadline = time.monotonic() + 120
        while "evaluating profile q8_0" not in proc.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "evaluating profile q8_0" in proc.log_path.read_text(), proc.log()
        time.sleep(1)
    finally:
        code = proc.stop()
    assert code in (0, -signal.SIGTERM), proc.log()
    log = proc.log_path.read_text()
    assert "Traceback" not in log, proc.log()
    assert "profile q8_0: ppl" not in log, "the evaluation finished before the stop: this tested nothing"
