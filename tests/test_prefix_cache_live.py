"""One KV pool per profile and the automatic prefix cache, on a live server with the embedded model."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest
from openai import OpenAI

from tests.conftest import ServerProcess

DEFAULT_PROFILES = ["base", "q8_0", "q4_k_m", "base-torch"]
# About 800 tokens of system prompt, as in a chat product with long instructions.
SYSTEM = " ".join(f"Rule {i}: answer politely, cite the section number {i}, and never invent facts about topic {i}."
                  for i in range(40))


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _counter(server: ServerProcess, name: str, profile: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf'^{name}{{profile="{re.escape(profile)}"}} (\S+)$', text, re.M)
    assert m, f"{name} for {profile} missing"
    return float(m.group(1))


def test_models_report_the_whole_context(server: ServerProcess) -> None:
    for profile in ("q4_k_m", "base-torch"):
        assert httpx.get(f"{server.url}/v1/models/{profile}").json()["max_model_len"] == 8192


@pytest.mark.parametrize("profile", ["q4_k_m", "base-torch"])
def test_a_prompt_longer_than_a_slot_share_is_served(client: OpenAI, profile: str) -> None:
    long_text = " ".join(f"Paragraph {i} of the report says the harbour grew by {i} boats that year."
                         for i in range(160))
    r = client.chat.completions.create(model=profile, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": long_text + "\nSummarize the report in one sentence."}])
    assert r.usage.prompt_tokens > 2400  # more than the 1,024 tokens a fixed share of 8 slots used to allow
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0


def test_a_prompt_over_the_model_context_is_400_naming_it(client: OpenAI) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="q4_k_m", prompt="word " * 9000, max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded" and "8192" in info.value.body["message"]


def test_second_chat_sharing_a_system_prompt_reuses_it_and_metrics_count_it(server: ServerProcess,
                                                                             client: OpenAI) -> None:
    system = f"[{uuid.uuid4().hex}] {SYSTEM}"  # a prefix no earlier test left in the cache
    queries0 = _counter(server, "shrinkserve_prefix_cache_queries_total", "q4_k_m")
    hits0 = _counter(server, "shrinkserve_prefix_cache_hits_total", "q4_k_m")
    usages = []
    for question in ("What is rule 3?", "What is rule 7?"):
        r = client.chat.completions.create(model="q4_k_m", max_tokens=6, temperature=0, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": question}])
        usages.append(r.usage)
    first, second = usages
    # the first finds at most the chat template's opening tokens ("<|im_start|>system\n") cached
    assert first.prompt_tokens > 700 and first.prompt_tokens_details.cached_tokens < 8
    assert second.prompt_tokens_details.cached_tokens >= first.prompt_tokens - 20  # all but the question
    assert _counter(server, "shrinkserve_prefix_cache_queries_total", "q4_k_m") - queries0 == (
        first.prompt_tokens + second.prompt_tokens)
    assert _counter(server, "shrinkserve_prefix_cache_hits_total", "q4_k_m") - hits0 == (
        first.prompt_tokens_details.cached_tokens + second.prompt_tokens_details.cached_tokens)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'shrinkserve_num_preemptions_total{profile="q4_k_m"}' in metrics
    assert 'shrinkserve_kv_cache_usage_perc{profile="q4_k_m"}' in metrics
    # the Responses API reports it under input_tokens_details
    resp = httpx.post(server.url + "/v1/responses", timeout=300, json={
        "model": "q4_k_m", "instructions": system, "input": "What is rule 9?", "max_output_tokens": 4,
        "temperature": 0}).json()
    assert resp["usage"]["input_tokens_details"]["cached_tokens"] > 700, resp["usage"]
    # streamed chat: the usage chunk carries it too
    chunks = list(client.chat.completions.create(
        model="q4_k_m", max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "What is rule 1?"}]))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 700


@pytest.mark.parametrize("profile", DEFAULT_PROFILES)
def test_seeded_text_is_the_same_with_the_cache_cold_and_warm(client: OpenAI, profile: str) -> None:
    """A prompt over one prefill chunk (512 tokens), twice: the second run finds it cached. On the PyTorch
    engine it reuses whole canonical chunks; on llama.cpp a seeded request runs in a lane of its own (a
    pooled sequence's rows depend on where its cells sit), so it reuses nothing. Same text either way."""
    prompt = f"[{uuid.uuid4().hex}] {SYSTEM}\nNow write a story about a dragon."

    def sample() -> tuple[str, int]:
        r = client.completions.create(model=profile, prompt=prompt, max_tokens=24, temperature=1.0, top_p=0.95,
                                      seed=77)
        return r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens

    cold, cold_cached = sample()
    warm, warm_cached = sample()
    assert cold_cached == 0 and (warm_cached >= 512 if profile == "base-torch" else warm_cached == 0)
    assert warm == cold, (profile, cold, warm)
