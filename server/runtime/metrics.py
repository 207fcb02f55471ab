"""Prometheus metric families, every one labelled by `profile`.

Names, meanings and bucket layouts follow vLLM's (`vllm:time_to_first_token_seconds` →
`shrinkserve_time_to_first_token_seconds`, ...), so a vLLM dashboard ports by renaming the prefix
and `model_name` → `profile`. Process RSS comes from prometheus-client's default process collector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from shrinkserve.server.runtime.types import CoreStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
BUILD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


class Metrics:
    """One set of families in its own registry (tests and several apps in one process don't collide)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        p = ["profile"]
        self.requests = Counter("shrinkserve_requests", "HTTP requests by profile and status code.",
                                ["profile", "status"], registry=r)
        self.request_success = Counter("shrinkserve_request_success", "Finished generations by finish reason.",
                                       ["profile", "finished_reason"], registry=r)
        self.ttft = Histogram("shrinkserve_time_to_first_token_seconds", "Time to first token (from arrival).",
                              p, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("shrinkserve_inter_token_latency_seconds", "Time between consecutive output tokens.",
                             p, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("shrinkserve_e2e_request_latency_seconds", "End-to-end request latency.",
                             p, buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("shrinkserve_request_queue_time_seconds", "Time spent waiting for a slot.",
                                    p, buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("shrinkserve_prompt_tokens", "Prompt tokens processed.", p, registry=r)
        self.generation_tokens = Counter("shrinkserve_generation_tokens", "Tokens generated.", p, registry=r)
        # Running / waiting / KV usage are read from each profile's core at scrape time (CoreGauges).
        self.core_gauges = CoreGauges()
        r.register(self.core_gauges)
        self.artifact_bytes = Gauge("shrinkserve_artifact_bytes", "Bytes of the profile's artifact on disk.",
                                    p, registry=r)
        self.resident_bytes = Gauge("shrinkserve_profile_resident_memory_bytes",
                                    "Process RSS added by loading the profile.", p, registry=r)
        self.profile_ready = Gauge("shrinkserve_profile_ready", "1 when the profile serves requests.", p, registry=r)
        self.build_seconds = Histogram("shrinkserve_compression_build_duration_seconds",
                                       "Time to build or fetch a profile's artifact.", p, buckets=BUILD_BUCKETS,
                                       registry=r)
        self.cache_events = Counter("shrinkserve_artifact_cache", "Artifact cache lookups by result.",
                                    ["profile", "result"], registry=r)
        # Quality against the base, from the profile's evaluation record (compression/quality.py).
        q = ["profile", "positions"]
        self.quality_ppl = Gauge("shrinkserve_quality_perplexity", "Perplexity on the held-out text.", p, registry=r)
        self.quality_ppl_ratio = Gauge("shrinkserve_quality_perplexity_ratio",
                                       "Perplexity divided by the base's on the same tokens.", p, registry=r)
        self.quality_kl = Gauge("shrinkserve_quality_kl_divergence",
                                "Mean KL(base || profile) of next-token distributions, nats.", q, registry=r)
        self.quality_top1 = Gauge("shrinkserve_quality_top1_agreement",
                                  "Fraction of positions where the profile's top token is the base's.", q, registry=r)
        self.quality_task = Gauge("shrinkserve_quality_task_score", "Accuracy on the shipped task set.", p,
                                  registry=r)
        self.decode_speed = Gauge("shrinkserve_decode_tokens_per_second",
                                  "Single-stream decode speed measured at evaluation time.", p, registry=r)
        self.rejected = Gauge("shrinkserve_profile_rejected", "1 when the profile failed its quality gate.", p,
                              registry=r)

    def set_quality(self, profile: str, record: dict | None, *, rejected: bool) -> None:
        self.rejected.labels(profile).set(int(rejected))
        if record is None:
            return
        self.quality_ppl.labels(profile).set(record["perplexity"])
        self.quality_ppl_ratio.labels(profile).set(record["ppl_ratio"])
        self.quality_kl.labels(profile, "all").set(record["kl"])
        self.quality_kl.labels(profile, "hardest_10pct").set(record["kl_hard10"])
        self.quality_top1.labels(profile, "all").set(record["top1"])
        self.quality_top1.labels(profile, "hardest_10pct").set(record["top1_hard10"])
        self.quality_task.labels(profile).set(record["task_score"])
        self.decode_speed.labels(profile).set(record["decode_tokens_per_s"])

    def declare(self, profile: str) -> None:
        """Create a profile's zero-valued children so series exist before the first request."""
        if profile not in self.core_gauges.profiles:
            self.core_gauges.profiles.append(profile)
        for g in (self.profile_ready, self.rejected):
            g.labels(profile).set(0)
        for c in (self.prompt_tokens, self.generation_tokens):
            c.labels(profile)
        for h in (self.ttft, self.itl, self.e2e, self.queue_time):
            h.labels(profile)


class CoreGauges(Collector):
    """`shrinkserve_num_requests_running|waiting`, `shrinkserve_kv_cache_usage_perc`, the prefix cache's
    `shrinkserve_prefix_cache_queries_total|hits_total` (tokens) and `shrinkserve_num_preemptions_total`, from
    the cores' own `stats()` at scrape time (vLLM's names); a profile without a loaded core reports zeros."""

    def __init__(self) -> None:
        self.profiles: list[str] = []
        self.source: Callable[[], Mapping[str, CoreStats | None]] = dict

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.source()
        running = GaugeMetricFamily("shrinkserve_num_requests_running", "Generations running now.",
                                    labels=["profile"])
        waiting = GaugeMetricFamily("shrinkserve_num_requests_waiting",
                                    "Requests queued for room in the profile (admission or KV).", labels=["profile"])
        kv = GaugeMetricFamily("shrinkserve_kv_cache_usage_perc",
                               "Fraction of the profile's KV pool held by running sequences (0..1).",
                               labels=["profile"])
        queries = CounterMetricFamily("shrinkserve_prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.", labels=["profile"])
        hits = CounterMetricFamily("shrinkserve_prefix_cache_hits",
                                   "Prompt tokens whose KV came from the prefix cache.", labels=["profile"])
        preempted = CounterMetricFamily("shrinkserve_num_preemptions",
                                        "Sequences preempted for KV room (recomputed later).", labels=["profile"])
        for name in self.profiles:
            s = stats.get(name)
            running.add_metric([name], s.running if s else 0)
            waiting.add_metric([name], s.waiting if s else 0)
            kv.add_metric([name], s.kv_usage if s else 0.0)
            queries.add_metric([name], s.prefix_queries if s else 0)
            hits.add_metric([name], s.prefix_hits if s else 0)
            preempted.add_metric([name], s.preemptions if s else 0)
        yield from (running, waiting, kv, queries, hits, preempted)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
