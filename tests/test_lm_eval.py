"""lm-eval's `local-completions` model scores our shipped task through the live server (echo + logprobs,
remote tokenizer via /tokenizer_info, /tokenize, /detokenize), and agrees with `shrinkserve eval`'s scorer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shrinkserve.compression.cache import ArtifactCache
from shrinkserve.compression.profiles import BaseSpec, ProfileBuilder, ProfileSpec
from shrinkserve.compression.quality import EvalSet, Scorer, choice_logprobs, task_prompt
from shrinkserve.server.engines.loader import load_engine
from tests.conftest import REPO, ServerProcess

LIMIT = 6


@pytest.mark.slow
def test_lm_eval_local_completions_matches_our_scorer(server: ServerProcess, cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lm_eval"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
           "--include_path", str(REPO / "compression" / "lm_eval_tasks"), "--tasks", "shrinkserve_mc",
           "--limit", str(LIMIT), "--log_samples", "--output_path", str(out),
           "--model_args", f"model=q8_0,base_url={server.url}/q8/v1/completions,tokenizer_backend=remote,"
                           "num_concurrent=1,max_retries=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (samples_file,) = out.glob("*/samples_shrinkserve_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == LIMIT

    spec = ProfileSpec(method="gguf:q8_0")
    builder = ProfileBuilder(ArtifactCache(cache_dir), {"smollm2": BaseSpec()}, {"q8_0": spec}, threads=2)
    engine = load_engine(builder.build("q8_0"), spec, 2)
    try:
        scorer = Scorer(engine)
        tasks = EvalSet.load(tasks=LIMIT).tasks
        for sample, item in zip(sorted(samples, key=lambda s: s["doc_id"]), tasks, strict=True):
            theirs = [float(r[0]) for r in sample["filtered_resps"]]
            ours = choice_logprobs(scorer, *task_prompt(item))
            assert theirs == pytest.approx(ours, abs=0.02), item["question"]
            assert sample["acc"] == float(max(range(len(ours)), key=ours.__getitem__) == item["answer"])
    finally:
        engine.close()
