"""Traffic capture end to end: a live server writes each finished generation of a teacher profile as a capture
record (compression/traffic/) holding the API's own top_logprobs and each sampled token's logprob; a
profile that is not a teacher, a profile that opts out and an excluded route are not captured; the records
read back through `shrinkserve capture stats` and as AWQ/GPTQ calibration text."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from shrinkserve.compression.base_model import embedded_gguf_path
from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.calibration import calibration_samples, calibration_text
from shrinkserve.compression.profiles import BaseSpec, ProfileBuilder, ProfileSpec
from shrinkserve.compression.traffic.reader import ReadReport, read_records
from tests.conftest import ServerProcess


def test_a_teachers_traffic_is_captured_with_the_apis_logprobs(cache_dir: Path, tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    config = {
        "profiles": {"base": {"method": "gguf:f16", "is_teacher": True},
                     "quiet": {"method": "gguf:f16", "is_teacher": True, "capture": False},
                     "q8_0": {"method": "gguf:q8_0"}},
        "routes": {"/eval": "base"},
        "capture": {"dir": str(capture), "top_k": 5, "exclude_routes": ["/eval"]},
    }
    proc = ServerProcess(config, cache_dir, tmp_path / "server.log")
    chat = {"messages": [{"role": "user", "content": "Name a primary colour."}], "max_tokens": 12,
            "temperature": 0, "logprobs": True, "top_logprobs": 5}
    try:
        proc.wait_ready()
        r = httpx.post(proc.url + "/v1/chat/completions", json={**chat, "model": "base"}, timeout=120)
        assert r.status_code == 200, r.text
        answer = r.json()
        # streamed, on the completions endpoint: captured too
        body = {"model": "base", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0.7,
                "seed": 3, "stream": True}
        with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=120) as s:
            assert s.status_code == 200 and "[DONE]" in s.read().decode()
        # not captured: a profile that is no teacher, a teacher that opts out, a route that is excluded
        for url, model in [("/v1/chat/completions", "q8_0"), ("/v1/chat/completions", "quiet"),
                           ("/eval/v1/chat/completions", "base")]:
            r = httpx.post(proc.url + url, json={**chat, "model": model}, timeout=120)
            assert r.status_code == 200, r.text
    finally:
        assert proc.stop() in (0, -signal.SIGTERM), proc.log()  # the writer closes its segment at shutdown

    report = ReadReport()
    records = list(read_records([capture], report=report))
    assert report.torn == report.corrupt == 0
    assert [r.route for r in records] == ["/v1/chat/completions", "/v1/completions"], proc.log()
    rec = records[0]
    t = rec.teacher
    assert t.profile == "base" and t.vocab_size == 49152 and t.tokenizer_sha256 and t.chat_template_sha256
    # the teacher is named by the cache key of the artifact the server served
    served = ProfileBuilder(ArtifactCache(cache_dir), {"smollm2": BaseSpec()},
                            {"base": ProfileSpec(method="gguf:f16", is_teacher=True)}, threads=2)
    assert t.artifact_key == served.key("base") and served.cache.lookup(t.artifact_key) is not None
    assert rec.sampling["temperature"] == 0 and rec.sampling["max_tokens"] == 12
    assert len(rec.prompt_ids) == answer["usage"]["prompt_tokens"]
    # every sampled token, the final EOS included (the API counts it in usage but does not list it)
    assert rec.n_tokens == answer["usage"]["completion_tokens"]
    api = answer["choices"][0]["logprobs"]["content"]
    assert len(api) == rec.n_tokens - (rec.finish_reason == "stop") and rec.finish_reason == \
        answer["choices"][0]["finish_reason"]
    assert rec.top_k == 5 and rec.topk_ids.shape == (rec.n_tokens, 5)
    for i, tok in enumerate(api):
        # the stored distribution is the one the API reported: same logprobs, best first
        assert rec.topk_logprobs[i].tolist() == pytest.approx([a["logprob"] for a in tok["top_logprobs"]], abs=1e-4)
        assert rec.sampled_logprobs[i] == pytest.approx(tok["logprob"], abs=1e-4)
        assert rec.completion_ids[i] == rec.topk_ids[i, 0]  # greedy: the sampled token is the best one
    assert np.all(np.diff(rec.topk_logprobs, axis=1) <= 0)
    streamed = records[1]
    assert streamed.sampling["seed"] == 3 and 1 <= streamed.n_tokens <= 5 and streamed.teacher == t
    assert np.all(np.isfinite(streamed.sampled_logprobs))

    # `shrinkserve capture stats` reads the directory
    stats = subprocess.run([sys.executable, "-m", "shrinkserve.server.cli", "capture", "stats", str(capture), "--json"],
                           capture_output=True, text=True, timeout=120)
    assert stats.returncode == 0, stats.stderr
    got = json.loads(stats.stdout)
    assert got["records"] == 2 and got["tokens"] == rec.n_tokens + streamed.n_tokens

    # The capture directory is calibration text for AWQ/GPTQ; a file that is not a capture is refused clearly.
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = calibration_text(capture, tok)
    assert "Name a primary colour." in text and answer["choices"][0]["message"]["content"] in text
    windows = calibration_samples(tok, capture, samples=2, seq_len=16)
    assert len(windows) == 2 and all(len(w) == 16 for w in windows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a captured-traffic record"):
        calibration_text(bad)
