"""`shrinkserve bench` as a user runs it: a subprocess load-testing the live session server."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import SHRINKSERVE, ServerProcess


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_bench_against_live_server(server: ServerProcess, api: str) -> None:
    r = subprocess.run(
        [*SHRINKSERVE, "bench", "--base-url", server.url + "/v1", "--model", "q8_0", "--requests", "2",
         "--concurrency", "1", "--max-tokens", "16", "--api", api, "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    result = json.loads(r.stdout)
    assert result["api"] == api
    assert result["requests"] == 2 and result["requests_ok"] == 2 and result["requests_failed"] == 0
    assert result["errors"] == []
    assert 0 < result["total_output_tokens"] <= 2 * 16
    assert result["usage_reported"] is True  # the server's usage chunk was seen on every request
    assert result["ttft_p50_s"] > 0 and result["ttft_p95_s"] >= result["ttft_p50_s"]
    assert result["wall_time_s"] > 0 and result["aggregate_tps"] > 0


def test_bench_reports_failures_with_exit_code_1(server: ServerProcess) -> None:
    r = subprocess.run(
        [*SHRINKSERVE, "bench", "--base-url", server.url + "/v1", "--model", "no-such-model", "--requests", "2",
         "--warmup", "0", "--max-tokens", "4", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    result = json.loads(r.stdout)
    assert result["requests_ok"] == 0 and result["requests_failed"] == 2
    assert any("404" in e for e in result["errors"]), result["errors"]


def test_bench_sweep_with_server_rss(server: ServerProcess) -> None:
    r = subprocess.run(
        [*SHRINKSERVE, "bench", "--url", server.url + "/v1", "--model", "q4_k_m", "--sweep", "1,2",
         "--max-tokens", "8", "--ignore-eos", "--pid", str(server.proc.pid), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    levels = json.loads(r.stdout)["sweep"]
    assert [x["concurrency"] for x in levels] == [1, 2]
    assert [x["requests_ok"] for x in levels] == [2, 4]
    assert all(x["total_output_tokens"] == x["requests_ok"] * 8 for x in levels)
    assert all(x["server_rss_max_bytes"] > 100 * 2**20 for x in levels)
    assert all(x["itl_p50_s"] > 0 for x in levels)


def run_workload(server: ServerProcess, *args: str) -> dict:
    r = subprocess.run([*SHRINKSERVE, "bench", "--url", server.url + "/v1", "--model", "q4_k_m", "--ignore-eos",
                        "--max-tokens", "4", "--json", *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return json.loads(r.stdout)


def test_shared_prefix_workload_sees_the_prefix_cache(server: ServerProcess) -> None:
    out = run_workload(server, "--workload", "shared-prefix", "--concurrency", "2", "--waves", "2")
    assert out["requests_ok"] == 2 and out["requests_failed"] == 0  # the warm wave is what is counted
    assert len(out["details"]["wave_walls_s"]) == 2
    # The ~800-token system prompt came from the cache (the server says so in usage).
    assert out["prompt_tokens_mean"] > 750 and out["cached_tokens_mean"] > 700


def test_multi_turn_long_prompt_and_distinct_workloads_run(server: ServerProcess) -> None:
    turns = run_workload(server, "--workload", "multi-turn", "--concurrency", "2", "--turns", "2")["details"]["turns"]
    assert [t["turn"] for t in turns] == [1, 2]
    assert turns[1]["prompt_tokens_mean"] > turns[0]["prompt_tokens_mean"]  # the history was resent
    assert turns[1]["cached_tokens_mean"] > 0
    long = run_workload(server, "--workload", "long-prompt", "--concurrency", "2", "--long-words", "600")
    assert long["details"]["long_ok"] and long["details"]["long_prompt_tokens"] > 600
    assert long["details"]["short_requests"] >= 1 and long["requests_failed"] == 0
    distinct = run_workload(server, "--workload", "distinct", "--concurrency", "2")
    assert distinct["requests_ok"] == 4 and distinct["cached_tokens_mean"] < 50  # only the template's header
