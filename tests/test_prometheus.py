"""Prometheus end to end: a real Prometheus scrapes the live server; promtool checks our exposition
and the shipped rules; every Grafana dashboard query runs against that Prometheus."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, ServerProcess, free_port
from tests.test_helm import find_tool

RULES = REPO / "deploy" / "prometheus" / "rules.yaml"
RULES_TEST = REPO / "deploy" / "prometheus" / "rules_test.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "shrinkserve-dashboard.json"
# Gauges the quality gates export (being added in the server); the dashboard may use them already.
QUALITY_GAUGES = {"shrinkserve_quality_perplexity", "shrinkserve_quality_kl_divergence",
                  "shrinkserve_quality_top1_agreement", "shrinkserve_quality_task_score",
                  "shrinkserve_profile_rejected"}
TRAFFIC = {"base": 3, "q8_0": 2}  # chat completions per profile


def scrape(server: ServerProcess) -> str:
    r = httpx.get(server.url + "/metrics", timeout=30)
    r.raise_for_status()
    return r.text


def sample_values(text: str, name: str) -> dict[str, float]:
    """{profile: value} of one sample name in an exposition text."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[s.labels["profile"]] = s.value
    return out


def exposed_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def chat(server: ServerProcess, profile: str) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": profile, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Name a colour."}]})
    assert r.status_code == 200, r.text


class Prometheus:
    """A real Prometheus on loopback with a 1 s scrape of one target and the shipped rules loaded."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "shrinkserve", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready:\n{self.log_path.read_text()}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def by_profile(self, expr: str) -> dict[str, float]:
        return {s["metric"].get("profile", ""): float(s["value"][1]) for s in self.query(expr)}

    def wait_for(self, expr: str, check, timeout: float = 45) -> dict[str, float]:
        """Poll `expr` (grouped by profile) until `check(values)` holds; return the values."""
        deadline = time.monotonic() + timeout
        values: dict[str, float] = {}
        while time.monotonic() < deadline:
            values = self.by_profile(expr)
            if check(values):
                return values
            time.sleep(0.5)
        raise AssertionError(f"{expr}: condition not met within {timeout}s; last values {values}\n"
                             f"{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def prometheus(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    prom = Prometheus(find_tool("prometheus"), f"127.0.0.1:{server.port}", tmp_path_factory.mktemp("prometheus"))
    try:
        prom.wait_ready()
        # Traffic only after the first successful scrape, so rates see it as an increase.
        prom.wait_for('up{job="shrinkserve"}', lambda v: v.get("") == 1.0)
        for profile, n in TRAFFIC.items():
            for _ in range(n):
                chat(server, profile)
        yield prom
    finally:
        prom.stop()


@pytest.mark.slow
def test_prometheus_scrapes_ttft_and_token_counters_per_profile(prometheus: Prometheus, server: ServerProcess) -> None:
    # No other traffic runs meanwhile, so Prometheus must converge on exactly what /metrics shows.
    truth = scrape(server)
    for name in ("shrinkserve_time_to_first_token_seconds_count", "shrinkserve_prompt_tokens_total",
                 "shrinkserve_generation_tokens_total"):
        expected = sample_values(truth, name)
        for profile, n in TRAFFIC.items():
            assert expected[profile] >= n, (name, expected)
        got = prometheus.wait_for(f"sum by (profile) ({name})",
                                  lambda v, e=expected: all(v.get(p) == e[p] for p in TRAFFIC))
        assert all(got[p] > 0 for p in TRAFFIC), (name, got)

    # The histogram is usable as one: a finite median TTFT per profile over the traffic window.
    quantiles = prometheus.wait_for(
        "histogram_quantile(0.5, sum by (profile, le) (rate(shrinkserve_time_to_first_token_seconds_bucket[1m])))",
        lambda v: all(p in v and math.isfinite(v[p]) for p in TRAFFIC))
    assert all(0 < quantiles[p] < 60 for p in TRAFFIC), quantiles


@pytest.mark.slow
def test_shipped_recording_rules_evaluate_on_live_data(prometheus: Prometheus) -> None:
    rates = prometheus.wait_for("profile:shrinkserve_generation_tokens:rate5m",
                                lambda v: all(v.get(p, 0) > 0 for p in TRAFFIC))
    assert set(TRAFFIC) <= set(rates)
    p95 = prometheus.wait_for("profile:shrinkserve_time_to_first_token_seconds:p95_5m",
                              lambda v: all(p in v and math.isfinite(v[p]) for p in TRAFFIC))
    assert all(p95[p] > 0 for p in TRAFFIC)
    # Every rule group loaded and every rule evaluated without errors ("unknown" only until its first evaluation,
    # once a second here).
    deadline = time.monotonic() + 30
    while True:
        groups = httpx.get(prometheus.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for g in groups for rule in g["rules"]]
        if all(rule["health"] != "unknown" for rule in rules) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {g["name"] for g in groups} == {"shrinkserve.recording", "shrinkserve.alerts"}
    assert rules and all(rule["health"] == "ok" and not rule.get("lastError") for rule in rules), rules


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"${var['name']}", var["definition"]))
    return out


def concrete(expr: str) -> str:
    """A Grafana expression with its variables filled in, as Grafana would send it."""
    m = re.fullmatch(r"label_values\((.*), (\w+)\)", expr)
    if m:  # Grafana turns label_values(selector, label) into a series query; the selector is what runs
        expr = m.group(1)
    return expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$profile", ".*")


@pytest.mark.slow
def test_every_dashboard_query_runs_on_prometheus(prometheus: Prometheus) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    with_data = []
    for title, expr in exprs:
        result = prometheus.query(concrete(expr))  # asserts Prometheus accepted the PromQL
        if result:
            with_data.append(title)
    # Panels fed by the traffic above show data (quality gauges and build rates may legitimately not).
    for title in ("Time to first token (p50, p95)", "Generated tokens / s", "Prompt tokens / s",
                  "Requests / s by status", "Resident memory per profile", "Process resident memory",
                  "Profiles ready", "$profile"):
        assert title in with_data, f"dashboard panel {title!r} shows no data against a live server"


def test_dashboard_references_only_metrics_we_expose(server: ServerProcess) -> None:
    names = exposed_names(scrape(server))
    rules = yaml.safe_load(RULES.read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    dash = json.loads(DASHBOARD.read_text())
    assert {p["title"] for p in dash["panels"] if p["type"] == "row"} >= {"Latency", "Throughput",
                                                                          "Memory and artifacts", "Quality"}
    used: set[str] = set()
    for _title, expr in dashboard_exprs():
        used |= set(re.findall(r"\b((?:shrinkserve|process)_[a-z0-9_]+|profile:[a-z0-9_:]+)\b", expr))
    assert used, "no metric names found in the dashboard"
    unknown = used - names - QUALITY_GAUGES - recorded
    assert not unknown, f"dashboard uses metric names that /metrics does not expose: {sorted(unknown)}"
    # Every quality family the issue names has a panel.
    assert used >= QUALITY_GAUGES


def test_promtool_check_metrics_passes_on_live_exposition(server: ServerProcess) -> None:
    chat(server, "q8_0")  # histograms with observations, not only empty children
    text = scrape(server)
    r = subprocess.run([find_tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_promtool_rules_check_and_unit_tests() -> None:
    promtool = find_tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", str(RULES_TEST)], capture_output=True, text=True, timeout=120)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr
    # The unit tests cover every alert the file defines.
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULES_TEST.read_text())
    tested = {a["alertname"] for t in tests["tests"] for a in t.get("alert_rule_test", [])}
    assert alerts == tested, f"alerts without a promtool unit test: {sorted(alerts - tested)}"
