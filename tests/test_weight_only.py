"""Weight-only quantized profiles (int8, 4-bit RTN) of the default model on the PyTorch engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from shrinkserve.compression import data_file
from tests.conftest import ServerProcess

WEIGHT_ONLY = ["int8", "rtn-g64", "rtn-g32-sym"]


def http_perplexity(server: ServerProcess, profile: str, max_tokens: int = 1024, window: int = 512) -> float:
    """Perplexity of the held-out text's first `max_tokens` tokens, from echo logprobs over real HTTP."""
    ids = httpx.post(server.url + "/tokenize", json={"model": profile, "prompt": data_file("heldout.txt").read_text(),
                                                     "add_special_tokens": False}, timeout=60).json()["tokens"]
    ids = ids[:max_tokens]
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        r = httpx.post(server.url + "/v1/completions", timeout=300,
                       json={"model": profile, "prompt": chunk, "max_tokens": 0, "echo": True, "logprobs": 0})
        r.raise_for_status()
        lps = r.json()["choices"][0]["logprobs"]["token_logprobs"][1:]
        nll -= sum(lps)
        count += len(lps)
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def perplexities(server: ServerProcess) -> dict[str, float]:
    return {p: http_perplexity(server, p) for p in ["base-torch", *WEIGHT_ONLY]}


def assert_chats(server: ServerProcess, profile: str, timeout: float) -> None:
    """The profile (built on first use, so a long timeout) answers a chat request with some text."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=timeout,
                   json={"model": profile, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                         "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip()


@pytest.mark.parametrize("profile", WEIGHT_ONLY)
def test_weight_only_profile_builds_and_chats(server: ServerProcess, profile: str) -> None:
    assert_chats(server, profile, timeout=600)
    card = httpx.get(server.url + f"/v1/models/{profile}").json()
    assert card["state"] == "ready" and card["engine"] == "torch"


def test_artifacts_are_smaller_than_the_dense_checkpoint(server: ServerProcess) -> None:
    for p in WEIGHT_ONLY:
        httpx.post(server.url + "/v1/completions", json={"model": p, "prompt": "Hi", "max_tokens": 1}, timeout=600)
    cards = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    dense_bf16 = cards["base-torch"]["bytes_on_disk"] / 2  # the base checkpoint is float32 on disk
    # int8 linears are half of bf16, but the bf16 embedding stays and the int8 lm_head is an extra copy
    # (the dense model ties them): 0.72 of the bf16 size for SmolLM2.
    assert cards["int8"]["bytes_on_disk"] < 0.75 * dense_bf16
    assert cards["rtn-g64"]["bytes_on_disk"] < cards["int8"]["bytes_on_disk"]
    # With tied embeddings a dense lm_head is free on disk (it is the embedding), while a quantized
    # lm_head is an extra copy: the g32 profile that keeps it dense is the smaller one.
    assert cards["rtn-g32-sym"]["bytes_on_disk"] < cards["rtn-g64"]["bytes_on_disk"]


def test_quality_ordering_on_heldout_text(perplexities: dict[str, float]) -> None:
    base = perplexities["base-torch"]
    assert 5 < base < 60, perplexities
    assert perplexities["int8"] < base * 1.03, perplexities  # int8 weight-only is nearly lossless
    for p in ("rtn-g64", "rtn-g32-sym"):
        assert base < perplexities[p] < base * 2.0, perplexities


def test_quantized_manifest_records_the_recipe(server: ServerProcess, cache_dir: Path) -> None:
    manifests = [json.loads(m.read_text()) for m in cache_dir.glob("artifacts/*/manifest.json")]
    rtn = [m for m in manifests if m["recipe"].get("kind") == "rtn" and m["recipe"].get("group_size") == 64]
    assert rtn, [m["name"] for m in manifests]
    assert rtn[0]["recipe"]["lm_head_bits"] == 8 and rtn[0]["recipe"]["symmetric"] is False
    assert "shrinkserve_compressed_tensors.json" in rtn[0]["files"]  # stored as compressed-tensors


# ------------------------------------------------------------------ AWQ / GPTQ (llm-compressor)

LIBRARY = ["gptq-g64", "awq-g64"]


@pytest.fixture(scope="module")
def library_perplexities(server: ServerProcess) -> dict[str, float]:
    return {p: http_perplexity(server, p) for p in ["base-torch", "rtn-g64-dense-head", *LIBRARY]}


@pytest.mark.slow
@pytest.mark.parametrize("profile", LIBRARY)
# The first request builds the profile with llm-compressor (AWQ's grid search: 8-15 min on 2 cores, more beside
# another CPU-heavy process): the chat's own wait, not the suite's 900 s per test, bounds it.
@pytest.mark.timeout(2100)
def test_library_profile_builds_and_chats(server: ServerProcess, profile: str) -> None:
    assert_chats(server, profile, timeout=1800)


@pytest.mark.slow
def test_awq_and_gptq_beat_round_to_nearest(library_perplexities: dict[str, float]) -> None:
    """The point of AWQ/GPTQ: at the same group size (64) and with the same dense lm_head, they must not be
    worse than plain round-to-nearest, and they stay within 30% of the base's perplexity."""
    p = library_perplexities
    for method in LIBRARY:
        assert p[method] <= p["rtn-g64-dense-head"], p
        assert p[method] < p["base-torch"] * 1.3, p


@pytest.mark.slow
def test_library_artifacts_reload_from_the_cache(server: ServerProcess, cache_dir: Path) -> None:
    import os
    import subprocess
    import sys

    for p in LIBRARY:  # built by the tests above (or now, if run alone)
        httpx.post(server.url + "/v1/completions", json={"model": p, "prompt": "Hi", "max_tokens": 1}, timeout=1800)
    out = subprocess.run(
        [sys.executable, "-m", "shrinkserve.server.cli", "compress", "--config", str(server.config_path),
         *[arg for p in LIBRARY for arg in ("--profile", p)]],
        env={**os.environ, "SHRINKSERVE_CACHE_DIR": str(cache_dir)}, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.split(" ")[0] in LIBRARY]
    assert len(lines) == 2 and all("cache hit" in line for line in lines), out.stdout
