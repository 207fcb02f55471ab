"""A distilled student of the real model is served: through /v1/chat/completions on the PyTorch engine, and
as GGUF Q8_0 (`then: gguf:q8_0`) on llama.cpp, both with quality records (prose against the base, held-out
traffic against the teacher). Both profiles load lazily (the method's default): the first request builds
them. Minutes on 2 cores."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess

PROMPTS = ["Write the plural form of the noun 'cliff'.", "What is the antonym of 'day'?",
           "Write the past tense of 'run'.", "Name a word that means the opposite of 'guilty'.",
           "Write the plural form of the noun 'mouse'.", "What is the antonym of 'early'?",
           "Write the past tense of 'swim'.", "Write the plural form of the noun 'box'."]


# Teacher data, two training steps, the GGUF export and both evaluations: 60-140 s on a quiet box, several
# times that on a loaded one; the waits below add up to this budget instead of the suite's 900 s per test.
@pytest.mark.slow
@pytest.mark.timeout(2100)
def test_a_distilled_student_and_its_q8_0_are_served_with_quality_records(cache_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    student = {"method": "distill", "data": {"synthetic": {"prompts": str(prompts), "max_tokens": 8},
                                             "heldout_fraction": 0.25},
               "student": {"drop_layers": 10, "calibration_samples": 4},
               "budget": {"steps": 2, "tokens": None, "seconds": None}, "optimizer": {"batch": 4},
               "evaluation": {"every": 2, "examples": 2}, "device": "cpu", "dtype": "float32"}
    config = {"profiles": {"student": student, "student-q8": {**student, "then": "gguf:q8_0"}},
              "evaluation": {"on_build": True, "max_tokens": 128, "tasks": 4}}
    proc = ServerProcess(config, cache_dir, tmp_path / "server.log")
    try:
        proc.wait_ready(timeout=900)
        for model in ("student", "student-q8"):
            body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 6,
                    "temperature": 0}
            r = httpx.post(proc.url + "/v1/chat/completions", json=body, timeout=400)  # builds on first use
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
        deadline = time.monotonic() + 300
        cards: dict = {}
        while time.monotonic() < deadline:
            cards = {c["id"]: c for c in httpx.get(proc.url + "/v1/models", timeout=30).json()["data"]}
            if all(cards[m].get("quality") for m in ("student", "student-q8")):
                break
            time.sleep(3)
        for model in ("student", "student-q8"):
            q = cards[model]["quality"]
            assert q is not None, proc.log()
            assert q["kl"] > 0.01 and 0 < q["top1"] < 1  # a 20-layer student after 2 steps: clearly not the base
            t = q["traffic"]  # on the held-out quarter of its own prompts, against the teacher
            assert t["tokens"] > 0 and t["kl"] > 0.01 and 0 <= t["top1"] <= 1 and t["teacher"] == "engine"
        assert cards["student"]["quality"]["traffic"]["student_key"] == \
            cards["student-q8"]["quality"]["traffic"]["student_key"]
    finally:
        assert proc.stop() in (0, -signal.SIGTERM), proc.log()
