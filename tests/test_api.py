"""The OpenAI API of a live server on the embedded model, through the official `openai` client."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import ServerProcess

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
DEFAULT_PROFILES = ["base", "q8_0", "q4_k_m", "base-torch"]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    # No retries: a 503 must reach the test, not be retried away.
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("profile", DEFAULT_PROFILES)
def test_chat_streams_from_every_default_profile(client: OpenAI, profile: str) -> None:
    stream = client.chat.completions.create(model=profile, messages=CHAT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    assert text.strip()
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 24
    assert all(c.model == profile for c in chunks)


def test_chat_non_streaming_answers_and_counts(client: OpenAI) -> None:
    r = client.chat.completions.create(model="base", messages=CHAT, max_tokens=20, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    same_torch = client.chat.completions.create(model="base-torch", messages=CHAT, max_tokens=20, temperature=0)
    assert "Paris" in same_torch.choices[0].message.content


def test_streamed_text_equals_non_streamed(client: OpenAI) -> None:
    kwargs = dict(model="base", prompt="The three primary colors are", max_tokens=30, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    parts = [c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(parts) == whole


def test_max_tokens_gives_length_finish(client: OpenAI) -> None:
    r = client.completions.create(model="q8_0", prompt="Once upon a time", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_stop_sequences_cut_text_in_both_modes(client: OpenAI) -> None:
    prompt, kwargs = "Count: 1, 2, 3, 4,", dict(model="base", max_tokens=40, temperature=0)
    free = client.completions.create(prompt=prompt, **kwargs).choices[0].text
    assert " 7" in free, free  # the model keeps counting; otherwise this test proves nothing
    cut = client.completions.create(prompt=prompt, stop=[" 7", "zzz"], **kwargs)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == free[: free.index(" 7")]
    streamed = client.completions.create(prompt=prompt, stop=" 7", stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


@pytest.mark.parametrize("profile", ["base", "base-torch"])
def test_same_seed_same_text_other_seed_other_text(client: OpenAI, profile: str) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=profile, prompt="Write a story about a dragon.", max_tokens=40,
                                         temperature=1.0, top_p=0.95, seed=seed).choices[0].text

    a, b, c = sample(1234), sample(1234), sample(99)
    assert a == b
    assert a != c


def test_echo_logprobs_match_transformers_on_the_same_checkpoint(client: OpenAI) -> None:
    """lm-eval's loglikelihood request: prompt logprobs from the F16 GGUF vs transformers (fp32, same weights)."""
    prompt = "The cat sat on the mat"
    kwargs = dict(prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    gguf = client.completions.create(model="base", **kwargs).choices[0].logprobs
    torch_lp = client.completions.create(model="base-torch", **kwargs).choices[0].logprobs
    assert "".join(gguf.tokens) == prompt
    assert gguf.tokens == torch_lp.tokens
    assert gguf.token_logprobs[0] is None and torch_lp.token_logprobs[0] is None
    for a, b in zip(gguf.token_logprobs[1:], torch_lp.token_logprobs[1:], strict=True):
        assert abs(a - b) < 0.15, (gguf.token_logprobs, torch_lp.token_logprobs)
    on = gguf.tokens.index(" on")
    assert -1.5 < gguf.token_logprobs[on] < -0.7  # the brief's wrong echo gave -8.7; transformers gives -1.1
    for tok, lp, top in zip(gguf.tokens[1:], gguf.token_logprobs[1:], gguf.top_logprobs[1:], strict=True):
        assert top[tok] == pytest.approx(lp)  # the echoed token's own logprob, also among its top entries


def test_echo_with_one_generated_token_as_lm_eval_sends_it(client: OpenAI) -> None:
    r = client.completions.create(model="q8_0", prompt=[504, 2644, 2643], max_tokens=1, echo=True, logprobs=1,
                                  temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert r.choices[0].text.startswith("The cat sat")


def test_generated_logprobs_chat_and_completions(client: OpenAI) -> None:
    r = client.chat.completions.create(model="q8_0", messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    # usage counts a final EOS that the content does not list
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # greedy decoding: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode() == entry.token
    c = client.completions.create(model="q8_0", prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(math.isfinite(x) for x in lp.token_logprobs)


def test_batched_prompts_give_one_choice_each(client: OpenAI, server: ServerProcess) -> None:
    prompts = ["Paris is", "Berlin is"]
    r = client.completions.create(model="base", prompt=prompts, max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    counts = [httpx.post(server.url + "/tokenize", json={"model": "base", "prompt": p}).json()["count"]
              for p in prompts]
    assert r.usage.prompt_tokens == sum(counts)
    single = client.completions.create(model="base", prompt=prompts[1], max_tokens=4, temperature=0)
    assert r.choices[1].text == single.choices[0].text


def test_routes_serve_their_profile_whatever_the_model_field(server: ServerProcess) -> None:
    q4 = OpenAI(base_url=server.url + "/q4/v1", api_key="x", max_retries=0)
    q8 = OpenAI(base_url=server.url + "/q8/v1", api_key="x", max_retries=0)
    kwargs = dict(model="anything", prompt="The cat sat on the mat", max_tokens=0, echo=True, logprobs=0)
    a, b = q4.completions.create(**kwargs), q8.completions.create(**kwargs)
    assert (a.model, b.model) == ("q4_k_m", "q8_0")
    assert a.choices[0].logprobs.token_logprobs[1:] != b.choices[0].logprobs.token_logprobs[1:]
    assert [m.id for m in q4.models.list().data] == ["q4_k_m"]


def test_models_list_profiles_with_sizes_and_memory(client: OpenAI, server: ServerProcess) -> None:
    cards = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert {*DEFAULT_PROFILES, "q4_0-lazy"} <= set(cards)
    for name in DEFAULT_PROFILES:
        assert cards[name]["state"] == "ready"
        assert cards[name]["bytes_on_disk"] > 50e6
        assert cards[name]["resident_memory_bytes"] > 0
    assert cards["q8_0"]["bytes_on_disk"] < cards["base"]["bytes_on_disk"]
    assert cards["base"]["method"] == "gguf:f16" and cards["base-torch"]["engine"] == "torch"
    assert cards["q4_k_m"]["routes"] == ["/q4"]


def test_lazy_profile_builds_on_first_use(client: OpenAI, server: ServerProcess) -> None:
    before = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}["q4_0-lazy"]
    assert before["state"] in ("pending", "ready")  # ready if an earlier test touched it
    r = client.completions.create(model="q4_0-lazy", prompt="Hello", max_tokens=3)
    assert r.model == "q4_0-lazy"
    after = httpx.get(server.url + "/v1/models/q4_0-lazy").json()
    assert after["state"] == "ready" and after["bytes_on_disk"] > 0


# ------------------------------------------------------------------------ errors


def _error(call: Callable[[], object]) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    body = info.value.body
    assert isinstance(body, dict) and {"message", "type"} <= set(body), body
    return info.value


def test_unknown_model_is_404(client: OpenAI) -> None:
    err = _error(lambda: client.chat.completions.create(model="gpt-9", messages=CHAT))
    assert err.status_code == 404 and err.body["code"] == "model_not_found"
    assert httpx.get(str(client.base_url) + "models/gpt-9").status_code == 404


def test_context_overflow_is_400(client: OpenAI) -> None:
    err = _error(lambda: client.completions.create(model="base", prompt="hi", max_tokens=100_000))
    assert err.status_code == 400 and err.body["code"] == "context_length_exceeded"
    long_prompt = "word " * 9000
    err = _error(lambda: client.completions.create(model="base", prompt=long_prompt, max_tokens=10))
    assert err.status_code == 400 and err.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "base", "prompt": "x", "temperature": 3},
        {"model": "base", "prompt": "x", "top_p": 0},
        {"model": "base", "prompt": "x", "max_tokens": -1},
        {"model": "base", "prompt": "x", "n": 0},
        {"model": "base", "prompt": "x", "best_of": 2},
        {"model": "base", "prompt": "x", "logprobs": 50},
        {"model": "base", "prompt": []},
        {"model": "base", "prompt": [99999999]},
        {"model": "base", "prompt": "x", "stop": ["a"] * 20},
        {"model": "base", "prompt": "x", "stream_options": {"include_usage": True, "extra": 1}},
        {"prompt": "x"},
    ],
)
def test_bad_completion_parameters_are_400(server: ServerProcess, body: dict) -> None:
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "base", "messages": []},
        {"model": "base", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "base", "messages": CHAT, "top_logprobs": 2},
        {"model": "base", "messages": CHAT, "max_completion_tokens": 10**6},
    ],
)
def test_bad_chat_parameters_are_400(server: ServerProcess, body: dict) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"], r.text


def test_malformed_json_is_400(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def _hold_the_slot(server: ServerProcess, started: threading.Event, result: dict) -> threading.Thread:
    """A long stream on the one-slot profile; `result["done"]` once it ended with [DONE]."""

    def long_request() -> None:
        with httpx.stream("POST", server.url + "/one/v1/completions", timeout=120,
                          json={"model": "x", "prompt": "Tell me a long story.", "max_tokens": 200,
                                "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                started.set()
                if line == "data: [DONE]":
                    result["done"] = True

    t = threading.Thread(target=long_request)
    t.start()
    return t


@pytest.mark.parametrize("stream", [False, True])
def test_overload_is_429_before_the_response_and_server_keeps_serving(server: ServerProcess, stream: bool) -> None:
    """q4-one-slot has one sequence and no queue: a second concurrent request is turned away with a real
    429 status (also with stream=true: admission happens before the response starts), not lost."""
    started, first = threading.Event(), {}
    t = _hold_the_slot(server, started, first)
    assert started.wait(120)
    busy = httpx.post(server.url + "/one/v1/completions",
                      json={"model": "x", "prompt": "hi", "max_tokens": 2, "stream": stream})
    assert busy.status_code == 429, busy.text
    assert busy.headers["content-type"].startswith("application/json")
    err = busy.json()["error"]
    assert err["code"] == "server_busy" and err["type"] == "rate_limit_error"
    assert int(busy.headers["retry-after"]) >= 1
    t.join(120)
    assert first.get("done")
    ok = httpx.post(server.url + "/one/v1/completions", json={"model": "x", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert 'shrinkserve_requests_total{profile="q4-one-slot",status="429"}' in metrics


def test_client_disconnect_stops_generation_and_frees_the_slot(server: ServerProcess) -> None:
    body = {"model": "x", "prompt": "Tell me a long story.", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    t0 = time.monotonic()
    with httpx.stream("POST", server.url + "/one/v1/completions", json=body, timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 10:
                break  # hang up mid-stream
    # The only slot must come back quickly (decoding 3000 tokens would take a minute or more).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ok = httpx.post(server.url + "/one/v1/completions", json={"model": "x", "prompt": "hi", "max_tokens": 2})
        if ok.status_code == 200:
            break
        time.sleep(0.2)
    assert ok.status_code == 200, ok.text
    assert time.monotonic() - t0 < 30
    metrics = httpx.get(server.url + "/metrics").text
    assert 'shrinkserve_request_success_total{finished_reason="abort",profile="q4-one-slot"}' in metrics


# ------------------------------------------------------------------------ batching


def _stream_completion(server: ServerProcess, body: dict, log: list | None = None) -> dict:
    """One streamed completion: its text, finish reason, and (into `log`) the arrival time of each chunk."""
    out: dict = {"text": "", "finish": None, "chunks": 0, "done": False}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]
                out["text"] += choice["text"]
                out["finish"] = choice["finish_reason"] or out["finish"]
                if choice["text"]:
                    out["chunks"] += 1
                    if log is not None:
                        log.append(time.monotonic())
    return out


def test_eight_concurrent_streams_on_q4_k_m_all_progress(server: ServerProcess) -> None:
    """Eight streams at once on one profile: every one is admitted, decodes while the others do (none
    waits for another to finish) and gets all its tokens."""
    n, tokens = 8, 48
    logs: list[list[float]] = [[] for _ in range(n)]
    results: list[dict] = [{} for _ in range(n)]

    def run(i: int) -> None:
        body = {"model": "q4_k_m", "prompt": f"Story number {i}:", "max_tokens": tokens, "ignore_eos": True,
                "temperature": 0.8, "seed": i}
        results[i] = _stream_completion(server, body, logs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(r.get("done") and r["finish"] == "length" for r in results), results
    assert all(r["chunks"] >= tokens - 2 for r in results)  # chunks carry text; a held-back byte may merge two
    first_end = min(log[-1] for log in logs)
    # Interleaved, not queued: every stream had produced most of its tokens before the first one ended.
    assert all(sum(t <= first_end for t in log) >= tokens // 2 for log in logs), [len(x) for x in logs]
    stats = httpx.get(server.url + "/metrics").text
    assert 'shrinkserve_kv_cache_usage_perc{profile="q4_k_m"}' in stats


@pytest.mark.parametrize("profile", DEFAULT_PROFILES)
def test_seeded_text_is_the_same_alone_and_among_seven_other_streams(server: ServerProcess, profile: str) -> None:
    seeded = {"model": profile, "prompt": "Write a story about a dragon.", "max_tokens": 40, "temperature": 1.0,
              "top_p": 0.95, "seed": 4321}
    alone = _stream_completion(server, seeded)["text"]
    others: list[dict] = [{} for _ in range(7)]

    def other(i: int) -> None:
        others[i] = _stream_completion(server, {"model": profile, "prompt": f"Tell me about the number {i}.",
                                                "max_tokens": 60, "temperature": 1.0, "ignore_eos": True})

    threads = [threading.Thread(target=other, args=(i,)) for i in range(7)]
    for t in threads[:4]:
        t.start()
    time.sleep(0.5)  # the seeded request lands in the middle of running streams
    crowded: dict = {}
    middle = threading.Thread(target=lambda: crowded.update(_stream_completion(server, seeded)))
    middle.start()
    for t in threads[4:]:
        t.start()
    for t in [*threads, middle]:
        t.join(300)
    assert all(o.get("done") for o in others)
    assert crowded["text"] == alone, (profile, alone, crowded["text"])


def test_an_invalid_streaming_request_is_a_400_before_the_stream_starts(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": "x", "stream": True,
                                                          "max_tokens": 100_000})
    # validated before the stream starts, so a real status code and a JSON error, not an SSE event
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_tokenize_detokenize_round_trip(server: ServerProcess) -> None:
    t = httpx.post(server.url + "/tokenize", json={"model": "base", "prompt": "Hello world"}).json()
    assert t["count"] == len(t["tokens"]) > 0
    # one KV pool per profile: any one sequence may use the model's whole context (8,192 tokens)
    assert t["max_model_len"] == 8192 == httpx.get(server.url + "/v1/models/base").json()["max_model_len"]
    d = httpx.post(server.url + "/detokenize", json={"model": "base", "tokens": t["tokens"]}).json()
    assert d["prompt"] == "Hello world"
    chat = httpx.post(server.url + "/tokenize", json={"model": "base-torch", "messages": CHAT}).json()
    assert chat["count"] > t["count"]


def test_health_and_ready(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 200
    assert json.loads(ready.text)["profiles"]["base"]["state"] == "ready"
