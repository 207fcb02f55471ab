"""vLLM's own metrics on our /metrics: each child's `vllm:*` families, scraped at scrape time and labelled by
profile."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from shrinkserve.server.engines.vllm_process import Endpoint

__all__ = ["VllmMetricsRelay", "relabel_vllm_metrics"]

log = logging.getLogger("shrinkserve.vllm")


def relabel_vllm_metrics(text: str, profile: str, *, prefix: str = "vllm:") -> list[Any]:
    """Parse a Prometheus exposition and return its `prefix*` families with `profile` added to every sample."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    out = []
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith(prefix):
            continue
        m = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        m.samples = [Sample(s.name, {**s.labels, "profile": profile}, s.value, s.timestamp, s.exemplar)
                     for s in fam.samples]
        out.append(m)
    return out


class VllmMetricsRelay:
    """Collector over every vLLM child: at scrape time fetch each one's /metrics (short timeout) and merge
    the `vllm:*` families, samples labelled by profile. One relay per registry: two collectors yielding
    the same family name would make the exposition invalid.

        relay = VllmMetricsRelay(); registry.register(relay); relay.add("awq", endpoint)
    """

    def __init__(self, timeout: float = 2.0, fetch: Callable[[Endpoint], str] | None = None) -> None:
        self.timeout = timeout
        self._children: dict[str, Endpoint] = {}
        self._fetch = fetch or self._http_fetch

    def add(self, profile: str, endpoint: Endpoint) -> None:
        self._children[profile] = endpoint

    def remove(self, profile: str) -> None:
        self._children.pop(profile, None)

    def _http_fetch(self, endpoint: Endpoint) -> str:
        with httpx.Client(transport=endpoint.sync_transport(), timeout=self.timeout) as c:
            r = c.get(endpoint.base_url + "/metrics")
            r.raise_for_status()
            return r.text

    def describe(self) -> Iterable[Any]:
        return []  # families are only known at scrape time; registering must not scrape the children

    def collect(self) -> Iterable[Any]:
        merged: dict[str, Any] = {}
        for profile, endpoint in list(self._children.items()):
            try:
                families = relabel_vllm_metrics(self._fetch(endpoint), profile)
            except Exception as exc:  # a dead or starting child must not break our own /metrics
                log.debug("scraping vLLM metrics of %s failed: %s", profile, exc)
                continue
            for fam in families:
                if fam.name in merged:
                    merged[fam.name].samples.extend(fam.samples)
                else:
                    merged[fam.name] = fam
        return list(merged.values())
