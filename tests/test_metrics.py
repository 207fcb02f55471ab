"""GET /metrics of the live session server, parsed with prometheus-client's own parser."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess

# vLLM's bucket layouts (vllm/v1/metrics/loggers.py), which ours must keep so vLLM dashboards port.
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
             40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
            80.0]
VLLM_E2E = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
            960.0, 1920.0, 7680.0]
HISTOGRAMS = {
    "shrinkserve_time_to_first_token_seconds": VLLM_TTFT,
    "shrinkserve_inter_token_latency_seconds": VLLM_ITL,
    "shrinkserve_e2e_request_latency_seconds": VLLM_E2E,
    "shrinkserve_request_queue_time_seconds": VLLM_E2E,
}
MAX_TOKENS = 8


class Scrape:
    """One /metrics scrape: sample values by (sample name, labels) and the families' types."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, frozenset], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.values[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.values.get((name, frozenset(labels.items())))

    def __call__(self, name: str, **labels: str) -> float:
        value = self.get(name, **labels)
        assert value is not None, f"no sample {name}{labels}"
        return value

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(labels), v) for (n, labels), v in self.values.items() if n == name]

    def buckets(self, name: str, profile: str) -> dict[float, float]:
        out = {}
        for labels, v in self.series(name + "_bucket"):
            if labels.get("profile") == profile:
                out[float(labels["le"])] = v
        return out


def scrape(server: ServerProcess) -> Scrape:
    r = httpx.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


@pytest.fixture(scope="module")
def traffic(server: ServerProcess) -> tuple[Scrape, Scrape, dict[str, dict[str, int]]]:
    """Scrape, send requests to "base" (by model name) and "q8_0" (by route), scrape again.

    Returns (before, after, usage per profile: requests, prompt and completion tokens).
    """
    before = scrape(server)
    usage: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def record(profile: str, body: dict) -> None:
        u = body["usage"]
        usage[profile]["requests"] += 1
        usage[profile]["prompt"] += u["prompt_tokens"]
        usage[profile]["completion"] += u["completion_tokens"]

    with httpx.Client(base_url=server.url, timeout=120) as http:
        r = http.post("/v1/completions", json={"model": "base", "prompt": "The three primary colors are",
                                               "max_tokens": MAX_TOKENS, "ignore_eos": True})
        assert r.status_code == 200, r.text
        record("base", r.json())
        r = http.post("/v1/chat/completions", json={
            "model": "base", "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": MAX_TOKENS,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        record("base", r.json())
        for prompt in ("Once upon a time", "The capital of Germany is"):
            r = http.post("/q8/v1/completions", json={"model": "whatever", "prompt": prompt,
                                                      "max_tokens": MAX_TOKENS, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["model"] == "q8_0", r.text
            record("q8_0", r.json())
        # Streaming counts too; usage comes in the last chunk.
        body = {"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": MAX_TOKENS,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with http.stream("POST", "/q8/v1/chat/completions", json=body) as s:
            assert s.status_code == 200
            lines = [line for line in s.iter_lines() if line.startswith("data: {")]
        record("q8_0", json.loads(lines[-1].removeprefix("data: ")))
        missing = http.post("/v1/chat/completions", json={"model": "no-such-model",
                                                          "messages": [{"role": "user", "content": "x"}]})
        assert missing.status_code == 404
    return before, scrape(server), usage


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after(name, **labels) - (before.get(name, **labels) or 0.0)


@pytest.mark.parametrize("profile", ["base", "q8_0"])
def test_requests_and_tokens_counted_by_profile(traffic, profile: str) -> None:
    before, after, usage = traffic
    u = usage[profile]
    assert u["requests"] == 2 + (profile == "q8_0")
    assert u["completion"] == u["requests"] * MAX_TOKENS  # ignore_eos: exactly max_tokens each
    assert after.types["shrinkserve_requests"] == "counter"
    assert delta(before, after, "shrinkserve_requests_total", profile=profile, status="200") == u["requests"]
    assert delta(before, after, "shrinkserve_prompt_tokens_total", profile=profile) == u["prompt"]
    assert delta(before, after, "shrinkserve_generation_tokens_total", profile=profile) == u["completion"]
    assert delta(before, after, "shrinkserve_request_success_total", profile=profile,
                 finished_reason="length") == u["requests"]


def test_route_requests_are_labelled_with_the_routed_profile(traffic) -> None:
    _, after, _ = traffic
    labels = {lab.get("profile") for lab, _ in after.series("shrinkserve_requests_total")}
    assert "whatever" not in labels
    assert labels <= {"base", "q8_0", "q4_k_m", "base-torch", "q4_0-lazy", "q4-one-slot", "none"}


def test_unknown_model_counted_under_profile_none(traffic) -> None:
    before, after, _ = traffic
    assert delta(before, after, "shrinkserve_requests_total", profile="none", status="404") == 1


@pytest.mark.parametrize("profile", ["base", "q8_0"])
def test_latency_histograms_count_every_request(traffic, profile: str) -> None:
    before, after, usage = traffic
    n, tokens = usage[profile]["requests"], usage[profile]["completion"]
    for name in HISTOGRAMS:
        assert after.types[name] == "histogram"
    ttft = delta(before, after, "shrinkserve_time_to_first_token_seconds_count", profile=profile)
    e2e = delta(before, after, "shrinkserve_e2e_request_latency_seconds_count", profile=profile)
    queue = delta(before, after, "shrinkserve_request_queue_time_seconds_count", profile=profile)
    itl = delta(before, after, "shrinkserve_inter_token_latency_seconds_count", profile=profile)
    assert ttft == e2e == queue == n
    assert n <= itl <= tokens - n  # one gap per token after the first (a step may carry several tokens)
    assert delta(before, after, "shrinkserve_time_to_first_token_seconds_sum", profile=profile) > 0
    assert delta(before, after, "shrinkserve_e2e_request_latency_seconds_sum", profile=profile) > \
        delta(before, after, "shrinkserve_time_to_first_token_seconds_sum", profile=profile)


@pytest.mark.parametrize("name", list(HISTOGRAMS))
def test_histograms_use_vllm_bucket_layout(traffic, name: str) -> None:
    _, after, _ = traffic
    for profile in ("base", "q8_0"):
        buckets = after.buckets(name, profile)
        assert sorted(buckets) == [*HISTOGRAMS[name], math.inf]
        counts = [buckets[le] for le in sorted(buckets)]
        assert counts == sorted(counts), "buckets must be cumulative"
        assert buckets[math.inf] == after(name + "_count", profile=profile)
    ttft = after.buckets("shrinkserve_time_to_first_token_seconds", "base")
    assert 0.001 in ttft and 2560.0 in ttft


@pytest.mark.usefixtures("traffic")
def test_gauges_idle_and_memory(server: ServerProcess) -> None:
    cards = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    deadline = time.monotonic() + 30  # gauges drop back once the last slot is handed back
    while True:
        now = scrape(server)
        busy = [(lab, v) for name in ("shrinkserve_num_requests_running", "shrinkserve_num_requests_waiting")
                for lab, v in now.series(name) if v != 0]
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not busy, busy
    for name in ("shrinkserve_num_requests_running", "shrinkserve_num_requests_waiting"):
        assert now.types[name] == "gauge"
        assert {lab["profile"] for lab, _ in now.series(name)} == set(cards)  # declared for every profile
    ready = {lab["profile"] for lab, v in now.series("shrinkserve_profile_ready") if v == 1}
    assert {"base", "q8_0", "q4_k_m", "base-torch"} <= ready
    assert ready == {name for name, card in cards.items() if card["state"] == "ready"}
    for profile in ready:
        assert now("shrinkserve_artifact_bytes", profile=profile) == cards[profile]["bytes_on_disk"] > 0
        assert now("shrinkserve_profile_resident_memory_bytes", profile=profile) > 0
    assert now("process_resident_memory_bytes") > 100 * 2**20  # four models are loaded


def test_cache_events_counted(traffic) -> None:
    _, after, _ = traffic
    assert after.types["shrinkserve_artifact_cache"] == "counter"
    events: dict[str, float] = defaultdict(float)
    for labels, v in after.series("shrinkserve_artifact_cache_total"):
        assert labels["result"] in ("hit", "miss", "corrupt"), labels
        events[labels["profile"]] += v
    for profile in ("base", "q8_0", "q4_k_m", "base-torch"):
        assert events[profile] >= 1, dict(events)
    builds = after("shrinkserve_compression_build_duration_seconds_count", profile="q8_0")
    assert builds == 1
