"""Server and cache life cycle across processes: broken profiles, restarts, corruption, concurrent builders.

Every test gets its own fresh artifact cache and only GGUF profiles (each builds in seconds).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SHRINKSERVE, ServerProcess

Start = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Start]:
    """Start `shrinkserve serve` processes; all are stopped at teardown and must exit cleanly."""
    started: list[ServerProcess] = []

    def start(config: dict, cache: Path) -> ServerProcess:
        proc = ServerProcess(config, cache, tmp_path / f"server{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        code = proc.stop()
        assert code in (0, -signal.SIGTERM), f"server exited with {code}:\n{proc.log()}"


def stop(proc: ServerProcess) -> None:
    code = proc.stop()
    assert code in (0, -signal.SIGTERM), f"server exited with {code}:\n{proc.log()}"


def cache_events(proc: ServerProcess, profile: str) -> dict[str, float]:
    text = httpx.get(proc.url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "shrinkserve_artifact_cache":
            for s in family.samples:
                if s.name.endswith("_total") and s.labels["profile"] == profile:
                    out[s.labels["result"]] = s.value
    return out


def manifests(cache: Path) -> dict[str, Path]:
    """Artifact name → manifest path; fails if a name occurs twice."""
    found = [(json.loads(p.read_text())["name"], p) for p in sorted((cache / "artifacts").glob("*/manifest.json"))]
    names = Counter(name for name, _ in found)
    assert all(n == 1 for n in names.values()), names
    return dict(found)


def manifest_of(cache: Path, suffix: str) -> Path:
    (path,) = [p for name, p in manifests(cache).items() if name.endswith(suffix)]
    return path


def complete(proc: ServerProcess, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    return httpx.post(proc.url + "/v1/completions", json=body, timeout=120)


def run_cli(*args: str, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHRINKSERVE_CACHE_DIR": str(cache)}
    return subprocess.run([*SHRINKSERVE, *args], capture_output=True, text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------ a broken profile


def test_broken_profile_fails_alone(tmp_path: Path, start_server: Start) -> None:
    junk = tmp_path / "x.gguf"
    junk.write_bytes(os.urandom(64 * 1024))
    config = {"profiles": {"good": {"method": "gguf:q4_0"}, "broken": {"method": "gguf:file", "path": str(junk)}},
              "routes": {"/bad": "broken"}}
    proc = start_server(config, tmp_path / "cache")
    proc.wait_ready(timeout=120, path="/health")

    deadline = time.monotonic() + 300
    while True:
        cards = {m["id"]: m for m in httpx.get(proc.url + "/v1/models", timeout=10).json()["data"]}
        if cards["good"]["state"] == "ready" and cards["broken"]["state"] == "failed":
            break
        assert time.monotonic() < deadline, f"{cards}\n{proc.log()}"
        assert cards["good"]["state"] != "failed", cards["good"]
        time.sleep(0.3)
    assert "Failed to load model" in cards["broken"]["error"], cards["broken"]

    ready = httpx.get(proc.url + "/ready", timeout=10)
    assert ready.status_code == 503
    body = ready.json()
    assert body["ready"] is False
    assert body["profiles"]["good"] == {"state": "ready", "load": "eager"}
    assert body["profiles"]["broken"]["state"] == "failed" and body["profiles"]["broken"]["error"]

    for r in (complete(proc, "broken"),
              httpx.post(proc.url + "/bad/v1/chat/completions", timeout=60,
                         json={"model": "x", "messages": [{"role": "user", "content": "hi"}]})):
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["type"] == "service_unavailable_error" and err["code"] == "profile_not_ready"
        assert "'broken'" in err["message"] and "Failed to load model" in err["message"]
        assert r.headers.get("retry-after")

    ok = complete(proc, "good")
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] > 0
    assert httpx.get(proc.url + "/health", timeout=10).json() == {"status": "ok"}
    metrics = httpx.get(proc.url + "/metrics", timeout=10).text
    assert 'shrinkserve_requests_total{profile="broken",status="503"} 2.0' in metrics
    assert 'shrinkserve_profile_ready{profile="broken"} 0.0' in metrics
    assert 'shrinkserve_profile_ready{profile="good"} 1.0' in metrics


# ------------------------------------------------------------------ restarts on one cache

Q8 = {"profiles": {"q8_0": {"method": "gguf:q8_0"}}}


def test_restart_reuses_the_cache(tmp_path: Path, start_server: Start) -> None:
    cache = tmp_path / "cache"
    first = start_server(Q8, cache)
    first.wait_ready(timeout=300)
    assert cache_events(first, "q8_0") == {"miss": 1.0}
    answer = complete(first, "q8_0").json()["choices"][0]["text"]
    stop(first)
    path = manifest_of(cache, "/q8_0")
    before = (path.read_text(), path.stat().st_mtime_ns, sorted(p.name for p in (cache / "artifacts").iterdir()))

    second = start_server(Q8, cache)
    second.wait_ready(timeout=300)
    assert cache_events(second, "q8_0") == {"hit": 1.0}  # and no "miss"
    after = (path.read_text(), path.stat().st_mtime_ns, sorted(p.name for p in (cache / "artifacts").iterdir()))
    assert after == before
    ready_line = next(line for line in second.log().splitlines() if "profile q8_0 ready" in line)
    assert ready_line.endswith("cache hit"), ready_line
    r = complete(second, "q8_0")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == answer  # greedy: same file, same text


def test_corrupt_artifacts_are_rebuilt(tmp_path: Path, start_server: Start) -> None:
    cache = tmp_path / "cache"
    built = run_cli("compress", "--profile", "q8_0", "--config", str(_write(tmp_path, Q8)), cache=cache)
    assert built.returncode == 0, built.stderr
    q8_manifest, f16_manifest = manifest_of(cache, "/q8_0"), manifest_of(cache, "/base-f16")
    old_q8, old_f16 = json.loads(q8_manifest.read_text()), json.loads(f16_manifest.read_text())
    q8_file, f16_file = q8_manifest.parent / "model-q8_0.gguf", f16_manifest.parent / "model-f16.gguf"
    size = q8_file.stat().st_size
    os.truncate(q8_file, size // 2)  # a crash or a full disk: caught by the size check
    with open(f16_file, "r+b") as f:  # bit rot: same size, caught only by the hash
        f.seek(f16_file.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))

    proc = start_server(Q8, cache)
    proc.wait_ready(timeout=300)
    events = cache_events(proc, "q8_0")
    assert events.get("corrupt") == 1 and events.get("miss") == 1 and "hit" not in events, events
    r = complete(proc, "q8_0")
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0

    new_q8, new_f16 = json.loads(q8_manifest.read_text()), json.loads(f16_manifest.read_text())
    assert new_q8["built_at"] != old_q8["built_at"] and new_f16["built_at"] != old_f16["built_at"]
    assert new_q8["files"] == old_q8["files"]  # llama.cpp's quantizer is deterministic
    assert q8_file.stat().st_size == size
    assert set(manifests(cache)) == {"smollm2/base-f16", "smollm2/q8_0"}
    assert not [p for p in (cache / "tmp").iterdir() if p.name.startswith("build-")]


# ------------------------------------------------------------------ the compress and profiles commands


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_concurrent_builders_build_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    config = _write(tmp_path, {"profiles": {"q4_0": {"method": "gguf:q4_0"}}})
    env = {**os.environ, "SHRINKSERVE_CACHE_DIR": str(cache)}
    cmd = [*SHRINKSERVE, "compress", "--profile", "q4_0", "--config", str(config)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = [next(line for line in out.splitlines() if line.startswith("q4_0 ")) for out, _ in outs]
    assert sorted("built in" in line for line in lines) == [False, True], lines
    assert sorted("cache hit" in line for line in lines) == [False, True], lines
    paths = {line.split()[-1] for line in lines}
    assert len(paths) == 1 and Path(paths.pop()).is_file()  # both name the one artifact
    assert set(manifests(cache)) == {"smollm2/base-f16", "smollm2/q4_0"}  # one directory per artifact
    assert list((cache / "tmp").iterdir()) == []


def test_profiles_command_shows_cache_state(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    config = _write(tmp_path, {"profiles": {"q4_0": {"method": "gguf:q4_0"}, "q8_0": {"method": "gguf:q8_0"},
                                            "raw": {"method": "gguf:file", "path": __file__}}})

    def states() -> dict[str, dict]:
        r = run_cli("profiles", "--json", "--config", str(config), cache=cache)
        assert r.returncode == 0, r.stderr
        return {row["name"]: row for row in json.loads(r.stdout)}

    before = states()
    assert {n: r["state"] for n, r in before.items()} == {"q4_0": "missing", "q8_0": "missing", "raw": "source"}
    assert before["q4_0"]["bytes"] is None and before["q4_0"]["path"] is None and before["q4_0"]["key"]
    assert before["raw"]["bytes"] == Path(__file__).stat().st_size

    built = run_cli("compress", "--profile", "q4_0", "--config", str(config), cache=cache)
    assert built.returncode == 0, built.stderr

    after = states()
    assert after["q4_0"]["state"] == "cached" and after["q8_0"]["state"] == "missing"
    q4 = after["q4_0"]
    assert q4["key"] == before["q4_0"]["key"]
    assert Path(q4["path"]).is_file() and q4["bytes"] == Path(q4["path"]).stat().st_size > 50e6
    assert q4["built_at"] == json.loads((cache / "artifacts" / q4["key"] / "manifest.json").read_text())["built_at"]


# ------------------------------------------------------------------ graceful drain on SIGTERM


def _stream(url: str, body: dict, out: dict, first: threading.Event) -> None:
    """A streamed completion: text, finish reason, whether [DONE] came, and when it ended."""
    out.update(text="", finish=None, done=False, status=None)
    try:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    out["text"] += choice["text"]
                    out["finish"] = choice["finish_reason"] or out["finish"]
                    first.set()
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    out["ended"] = time.monotonic()


def test_sigterm_drains_running_streams_and_exits_zero(cache_dir: Path, tmp_path: Path) -> None:
    """SIGTERM mid-stream: /ready and new requests answer 503 at once, a short stream still finishes, long
    ones end with finish_reason "abort" and [DONE] after drain_timeout_seconds, and the process exits 0."""
    drain = 6.0
    config = {"profiles": {"q8_0": {"method": "gguf:q8_0"}}, "drain_timeout_seconds": drain}
    proc = ServerProcess(config, cache_dir, tmp_path / "server.log")
    try:
        proc.wait_ready(timeout=600)
        streams = [({"model": "q8_0", "prompt": f"Story {i}:", "max_tokens": 1000, "ignore_eos": True}, {})
                   for i in range(3)]
        streams.append(({"model": "q8_0", "prompt": "Short:", "max_tokens": 24, "ignore_eos": True}, {}))
        firsts = [threading.Event() for _ in streams]
        threads = [threading.Thread(target=_stream, args=(proc.url, body, out, ev))
                   for (body, out), ev in zip(streams, firsts, strict=True)]
        for t in threads:
            t.start()
        assert all(ev.wait(120) for ev in firsts), proc.log()
        proc.proc.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        deadline = t_term + 2
        while httpx.get(proc.url + "/ready", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/ready did not turn 503 right after SIGTERM"
            time.sleep(0.05)
        assert httpx.get(proc.url + "/health", timeout=5).status_code == 200
        refused = httpx.post(proc.url + "/v1/completions", json={"model": "q8_0", "prompt": "hi", "max_tokens": 2},
                             timeout=10)
        assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
        assert refused.json()["error"]["code"] == "server_shutting_down"
        for t in threads:
            t.join(120)
        code = proc.proc.wait(timeout=120)
    finally:
        proc.stop()
    log = proc.log()
    assert code == 0, f"exit code {code}:\n{log}"
    assert "Traceback" not in log, log
    *long, (_, short) = streams
    assert short["done"] and short["finish"] == "length", short
    for _, out in long:
        assert out["status"] == 200 and out["done"] and out["finish"] == "abort", out
        # they kept streaming through the drain window, then were cut
        assert drain - 1.5 <= out["ended"] - t_term <= drain + 20, (out["ended"] - t_term, out)
