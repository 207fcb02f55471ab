"""Traffic capture: a live server writes each finished generation, with its top-k teacher logprobs, to JSONL;
AWQ/GPTQ calibration can read that file back."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from shrinkserve.compression.base_model import embedded_gguf_path
from shrinkserve.compression.calibration import calibration_samples, calibration_text
from tests.conftest import ServerProcess


def test_captured_traffic_has_teacher_logprobs_and_calibrates(cache_dir: Path, tmp_path: Path) -> None:
    capture = tmp_path / "traffic" / "capture.jsonl"
    config = {"profiles": {"base": {"method": "gguf:f16"}, "q8_0": {"method": "gguf:q8_0"}},
              "capture": {"file": str(capture), "top_k": 5, "profiles": ["base"]}}
    proc = ServerProcess(config, cache_dir, tmp_path / "server.log")
    try:
        proc.wait_ready()
        body = {"model": "base", "messages": [{"role": "user", "content": "Name a primary colour."}],
                "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 5}
        r = httpx.post(proc.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        answer = r.json()
        # not captured: `capture.profiles` names only base
        httpx.post(proc.url + "/v1/chat/completions", json={**body, "model": "q8_0"}, timeout=120)
    finally:
        assert proc.stop() in (0, -signal.SIGTERM), proc.log()

    records = [json.loads(line) for line in capture.read_text().splitlines()]
    assert len(records) == 1, records
    rec = records[0]
    assert rec["profile"] == "base"
    assert len(rec["completion_ids"]) == answer["usage"]["completion_tokens"] - (rec["finish_reason"] == "stop")
    assert len(rec["prompt_ids"]) == answer["usage"]["prompt_tokens"]
    content = answer["choices"][0]["message"]["content"]
    assert rec["text"].endswith(content) and "Name a primary colour." in rec["text"][: rec["prompt_chars"]]
    # The stored distribution is the one the API reported: same top tokens, same logprobs.
    api_top = answer["choices"][0]["logprobs"]["content"]
    assert len(rec["teacher_topk"]) == len(api_top)
    for stored, returned in zip(rec["teacher_topk"], api_top, strict=True):
        assert len(stored) == 5
        assert [lp for _, lp in stored] == pytest.approx([t["logprob"] for t in returned["top_logprobs"]], abs=1e-4)
        assert stored[0][1] >= stored[-1][1]

    # Several records become calibration windows; a file that is not a capture is refused clearly.
    more = tmp_path / "more.jsonl"
    more.write_text("\n".join([json.dumps(rec)] * 6) + "\n")
    assert calibration_text(more).count(content) == 6
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    windows = calibration_samples(tok, more, samples=4, seq_len=16)
    assert len(windows) == 4 and all(len(w) == 16 for w in windows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a captured-traffic record"):
        calibration_text(bad)
