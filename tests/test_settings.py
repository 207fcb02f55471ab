"""Configuration: the shipped YAML, environment overrides, and invalid configs rejected with useful messages."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from shrinkserve.server.settings import cgroup_cpu_limit, default_config_path, load_settings
from tests.conftest import SHRINKSERVE


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the outer shell exports must not leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("SHRINKSERVE_"):
            monkeypatch.delenv(name)


def write_config(tmp_path: Path, config: dict | str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


# ------------------------------------------------------------------ valid configs


def test_shipped_default_config_loads() -> None:
    assert default_config_path().is_file()
    s = load_settings()
    assert list(s.profiles) == ["base", "q8_0", "q4_k_m", "base-torch"]
    methods = {name: (p.method, p.engine, p.base) for name, p in s.profiles.items()}
    assert methods == {
        "base": ("gguf:f16", "llamacpp", "smollm2"),
        "q8_0": ("gguf:q8_0", "llamacpp", "smollm2"),
        "q4_k_m": ("gguf:q4_k_m", "llamacpp", "smollm2"),
        "base-torch": ("hf", "torch", "smollm2"),
    }
    assert s.routes == {"/base": "base", "/q8": "q8_0", "/q4": "q4_k_m", "/torch": "base-torch"}
    assert set(s.bases) == {"smollm2"} and s.bases["smollm2"].source == "embedded"
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert all(p.load == "eager" for p in s.profiles.values())


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, {"profiles": {"only": {"method": "GGUF:Q4_0"}}, "port": 7001})
    monkeypatch.setenv("SHRINKSERVE_CONFIG", str(path))
    s = load_settings()
    assert list(s.profiles) == ["only"] and s.port == 7001
    assert s.profiles["only"].method == "gguf:q4_0"  # canonicalized
    assert s.routes == {}


def test_environment_overrides_yaml_and_arguments_override_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, {"port": 7001, "profiles": {"q8_0": {"method": "gguf:q8_0"}}})
    monkeypatch.setenv("SHRINKSERVE_PORT", "9123")
    monkeypatch.setenv("SHRINKSERVE_THREADS", "3")
    monkeypatch.setenv("SHRINKSERVE_CACHE_DIR", str(tmp_path / "c"))
    s = load_settings(path)
    assert (s.port, s.threads, s.cache_dir) == (9123, 3, tmp_path / "c")
    assert load_settings(path, port=9999).port == 9999  # what `serve --port` passes


def test_profiles_from_environment_json(monkeypatch: pytest.MonkeyPatch) -> None:
    # SHRINKSERVE_PROFILES is merged key by key over the YAML's profiles: a named profile's fields are
    # overridden, a new name is added, the rest stay.
    monkeypatch.setenv("SHRINKSERVE_PROFILES", json.dumps({
        "q8_0": {"method": "gguf:q8_0", "max_concurrency": 3, "load": "lazy"},
        "tiny": {"method": "gguf:q4_0", "context_length": 512},
    }))
    s = load_settings()
    assert s.profiles["q8_0"].max_concurrency == 3 and s.profiles["q8_0"].load == "lazy"
    assert s.profiles["tiny"].method == "gguf:q4_0" and s.profiles["tiny"].context_length == 512
    assert s.profiles["tiny"].base == "smollm2" and s.profiles["tiny"].engine == "llamacpp"
    assert s.profiles["base"].method == "gguf:f16"


def test_nested_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHRINKSERVE_PROFILES__Q4_K_M__MAX_QUEUE", "7")
    s = load_settings()
    assert s.profiles["q4_k_m"].max_queue == 7
    assert s.profiles["q4_k_m"].method == "gguf:q4_k_m"


def test_invalid_environment_value_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHRINKSERVE_PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        load_settings()


def test_route_prefixes_are_normalized(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"profiles": {"a": {"method": "gguf:q4_0"}}, "routes": {"small/": "a"}})
    assert load_settings(path).routes == {"/small": "a"}


# ------------------------------------------------------------------ invalid configs

A = {"method": "gguf:q4_0"}
INVALID = {
    "unknown method": (
        {"profiles": {"a": {"method": "gguf:q9_x"}}},
        ["profiles.a.method", "unknown method 'gguf:q9_x'", "gguf:q4_k_m"],
    ),
    "route to unknown profile": (
        {"profiles": {"a": A}, "routes": {"/b": "zzz"}},
        ["route '/b' names unknown profile 'zzz'"],
    ),
    "route prefix /v1": (
        {"profiles": {"a": A}, "routes": {"/v1": "a"}},
        ["route prefix '/v1' collides with a built-in endpoint"],
    ),
    "route prefix /": ({"profiles": {"a": A}, "routes": {"/": "a"}}, ["must look like '/q4'"]),
    "unknown base": (
        {"profiles": {"a": {"method": "gguf:q4_0", "base": "llama"}}},
        ["profile 'a' names unknown base 'llama'"],
    ),
    "missing base path": (
        {"bases": {"b": {"source": "/nonexistent/model.gguf"}}, "profiles": {"a": A}},
        ["bases.b.source", "'/nonexistent/model.gguf' is neither 'embedded' nor an existing local path"],
    ),
    "gguf:file without path": (
        {"profiles": {"a": {"method": "gguf:file"}}},
        ["profiles.a", "method 'gguf:file' needs 'path'"],
    ),
    "gguf:file with a missing path": (
        {"profiles": {"a": {"method": "gguf:file", "path": "/nonexistent/x.gguf"}}},
        ["path /nonexistent/x.gguf is not a file"],
    ),
    "engine cannot run method": (
        {"profiles": {"a": {"method": "hf", "engine": "llamacpp"}}},
        ["method 'hf' cannot run on engine 'llamacpp'"],
    ),
    "misspelled field": ({"profiles": {"a": {"method": "gguf:q4_0", "max_concurency": 2}}},
                         ["profiles.a.max_concurency", "Extra inputs are not permitted"]),
    "bad profile name": ({"profiles": {"a b": A}}, ["profile name 'a b' must match"]),
    "no profiles": ({"profiles": {}}, ["at least one profile is required"]),
    "capture of an unknown profile": ({"profiles": {"a": A}, "capture": {"dir": "/tmp", "profiles": ["b"]}},
                                      ["capture.profiles names unknown profile(s): b"]),
    "the older capture file": ({"profiles": {"a": A}, "capture": {"file": "/tmp/traffic.jsonl"}},
                               ["capture.file (one JSONL file) was replaced by capture.dir"]),
    "traffic gate on a quantized base": ({"profiles": {"a": {**A, "gate": {"min_traffic_top1": 0.5}}}},
                                         ["gate min_traffic_top1: method 'gguf:q4_0' has no held-out traffic"]),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_config_is_rejected_with_a_useful_message(tmp_path: Path, case: str) -> None:
    config, fragments = INVALID[case]
    with pytest.raises(ValidationError) as info:
        load_settings(write_config(tmp_path, config))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("profiles: {a: [\n", "is not valid YAML"), ("just a string\n", "must hold a YAML mapping")],
)
def test_unparseable_yaml_is_a_value_error(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        load_settings(write_config(tmp_path, text))


# ------------------------------------------------------------------ the CLI


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SHRINKSERVE_")}
    return subprocess.run([*SHRINKSERVE, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"profiles": {"a": {"method": "gguf:q9_x"}}}, "unknown method 'gguf:q9_x'"),
        ({"profiles": {"a": A}, "routes": {"/v1": "a"}}, "collides with a built-in endpoint"),
        ("profiles: {a: [\n", "is not valid YAML"),
    ],
    ids=["unknown-method", "route-v1", "yaml-syntax"],
)
def test_serve_with_bad_config_exits_with_a_readable_message(tmp_path: Path, config: dict | str,
                                                            fragment: str) -> None:
    path = write_config(tmp_path, config, "bad.yaml")
    r = run_cli("serve", "--config", str(path), "--port", "0")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("shrinkserve: ") and fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "Uvicorn running" not in r.stderr + r.stdout


def test_serve_with_missing_config_exits_with_a_readable_message(tmp_path: Path) -> None:
    r = run_cli("serve", "--config", str(tmp_path / "absent.yaml"))
    assert r.returncode == 2
    assert "absent.yaml does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(("content", "expected"), [
    ("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None), ("", None),
])
def test_cgroup_cpu_limit(tmp_path: Path, content: str, expected: int | None) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(content)
    assert cgroup_cpu_limit(cpu_max) == expected
    assert cgroup_cpu_limit(tmp_path / "missing") is None
