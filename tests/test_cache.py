"""Tests for shrinkserve.compression.cache, on real files under tmp_path."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from shrinkserve.compression.cache import Artifact, ArtifactCache, cache_key, hash_path

INPUTS = {"base_weights": "a" * 64}
RECIPE = {"method": "gguf", "quant": "Q4_K_M", "imatrix": False}
TOOLS = {"llama.cpp": "b4000", "gguf": "0.17.1"}
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


class CountingBuild:
    """Build function that records how often it ran."""

    def __init__(self, extra: Mapping[str, Any] | None = None) -> None:
        self.calls = 0
        self.extra = extra

    def __call__(self, out: Path) -> Mapping[str, Any] | None:
        self.calls += 1
        (out / "model.gguf").write_bytes(PAYLOAD)
        (out / "tokenizer").mkdir()
        (out / "tokenizer" / "tokenizer.json").write_text('{"vocab": {}}')
        return self.extra


def _get(cache: ArtifactCache, build, events: list[str] | None = None) -> tuple[Artifact, bool]:
    key = cache_key(INPUTS, RECIPE, TOOLS)
    return cache.get_or_build(
        key,
        name="tiny-q4",
        recipe=RECIPE,
        inputs=INPUTS,
        tools=TOOLS,
        build=build,
        on_event=None if events is None else events.append,
    )


def test_build_then_hit(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    build = CountingBuild(extra={"ppl": None, "n_tensors": 3})
    events: list[str] = []

    art, hit = _get(cache, build, events)
    assert not hit
    assert build.calls == 1
    assert art.path == tmp_path / "artifacts" / art.key
    m = art.manifest
    assert m["format"] == 1 and m["key"] == art.key and m["name"] == "tiny-q4"
    assert m["recipe"] == RECIPE and m["inputs"] == INPUTS and m["tools"] == TOOLS
    assert m["extra"] == {"ppl": None, "n_tensors": 3}
    assert set(m["files"]) == {"model.gguf", "tokenizer/tokenizer.json"}
    assert m["files"]["model.gguf"] == {"bytes": len(PAYLOAD), "sha256": hash_path(art.file("model.gguf"))}
    assert m["bytes"] == art.bytes == len(PAYLOAD) + len('{"vocab": {}}')
    assert m["built_at"].endswith("Z") and m["build_seconds"] >= 0
    assert json.loads((art.path / "manifest.json").read_text()) == m
    assert art.file("tokenizer") == art.path / "tokenizer"
    with pytest.raises(KeyError):
        art.file("nope.bin")

    art2, hit2 = _get(cache, build, events)
    assert hit2
    assert build.calls == 1
    assert art2.manifest == m
    assert events == ["miss", "hit"]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_cache_key_stability_and_sensitivity() -> None:
    base = cache_key(INPUTS, RECIPE, TOOLS)
    assert re.fullmatch("[0-9a-f]{64}", base), base  # sha256, hex
    # Same content, different dict order / mapping type: same key.
    reordered = dict(reversed(list(RECIPE.items())))
    assert cache_key(dict(INPUTS), reordered, dict(reversed(list(TOOLS.items())))) == base
    assert cache_key(INPUTS, RECIPE, TOOLS) == base
    assert cache_key({"base_weights": "b" * 64}, RECIPE, TOOLS) != base
    assert cache_key(INPUTS, {**RECIPE, "quant": "Q8_0"}, TOOLS) != base
    assert cache_key(INPUTS, {**RECIPE, "extra": 1}, TOOLS) != base
    assert cache_key(INPUTS, RECIPE, {**TOOLS, "llama.cpp": "b4001"}) != base
    # Fields are not interchangeable between sections.
    assert cache_key({}, {"x": "1"}, {}) != cache_key({"x": "1"}, {}, {})


def test_hash_path_file_and_directory(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"x" * (5 * 1024 * 1024 + 3))  # spans more than one 4 MiB chunk
    (d / "sub" / "b.json").write_text("{}")
    h1 = hash_path(d)
    assert h1 == hash_path(d)
    assert hash_path(d / "sub" / "b.json") == hashlib.sha256(b"{}").hexdigest()
    (d / "sub" / "b.json").write_text("{ }")
    assert hash_path(d) != h1
    (d / "sub" / "b.json").write_text("{}")
    assert hash_path(d) == h1
    (d / "sub" / "b.json").rename(d / "sub" / "c.json")
    assert hash_path(d) != h1
    with pytest.raises(FileNotFoundError):
        hash_path(tmp_path / "missing")


def test_truncated_file_is_detected_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = ArtifactCache(tmp_path)
    build = CountingBuild()
    art, _ = _get(cache, build)
    gguf = art.file("model.gguf")
    with open(gguf, "r+b") as f:
        f.truncate(len(PAYLOAD) // 2)

    with caplog.at_level(logging.WARNING, logger="shrinkserve.cache"):
        assert cache.lookup(art.key) is None
    assert any("model.gguf" in r.getMessage() for r in caplog.records if r.name == "shrinkserve.cache")
    assert not art.path.exists()
    assert list((tmp_path / "tmp").iterdir()) == []

    # Rebuilt by a caller that reports nothing: the corruption stays pending. Corrupt again, this time
    # found by get_or_build itself, which reports both.
    _get(cache, build)
    assert build.calls == 2
    with open(gguf, "r+b") as f:
        f.truncate(10)
    events: list[str] = []
    art3, hit = _get(cache, build, events)
    assert not hit
    assert build.calls == 3
    assert events == ["corrupt", "corrupt", "miss"]
    assert art3.file("model.gguf").read_bytes() == PAYLOAD
    assert cache.lookup(art.key) is not None


def test_flipped_byte_same_size_is_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = ArtifactCache(tmp_path)
    art, _ = _get(cache, CountingBuild())
    gguf = art.file("model.gguf")
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0x01
    gguf.write_bytes(bytes(data))
    assert gguf.stat().st_size == len(PAYLOAD)

    with caplog.at_level(logging.WARNING, logger="shrinkserve.cache"):
        assert cache.lookup(art.key) is None
    assert any("model.gguf" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    assert not art.path.exists()


def test_missing_file_and_missing_manifest_are_detected(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    build = CountingBuild()
    art, _ = _get(cache, build)
    (art.path / "tokenizer" / "tokenizer.json").unlink()
    assert cache.lookup(art.key, on_event=lambda e: None) is None  # reported here

    art, _ = _get(cache, build)
    (art.path / "manifest.json").unlink()
    events: list[str] = []
    _, hit = _get(cache, build, events)
    assert not hit and events == ["corrupt", "miss"] and build.calls == 3


def test_extra_unlisted_files_are_ignored(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    art, _ = _get(cache, CountingBuild())
    (art.path / "notes.txt").write_text("added later")
    found = cache.lookup(art.key)
    assert found is not None and found.manifest == art.manifest


def test_failing_build_leaves_nothing(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)

    def bad_build(out: Path) -> None:
        (out / "model.gguf").write_bytes(b"partial")
        raise RuntimeError("quantizer crashed")

    events: list[str] = []
    with pytest.raises(RuntimeError, match="quantizer crashed"):
        _get(cache, bad_build, events)
    assert events == ["miss"]
    assert list((tmp_path / "artifacts").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []
    assert cache.lookup(cache_key(INPUTS, RECIPE, TOOLS)) is None

    # The key is not poisoned: a later good build succeeds.
    build = CountingBuild()
    _, hit = _get(cache, build)
    assert not hit and build.calls == 1


def test_a_keys_work_dir_outlives_a_failed_build_and_goes_with_the_artifact(tmp_path: Path) -> None:
    """What a build keeps for a resume (training checkpoints) survives its failure, not its success."""
    cache = ArtifactCache(tmp_path)
    key = cache_key(INPUTS, RECIPE, TOOLS)
    work = cache.work_dir(key)
    assert not work.exists()

    def interrupted(out: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "step-1").write_text("checkpoint")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        _get(cache, interrupted)
    assert (work / "step-1").read_text() == "checkpoint"
    resumed: list[str] = []

    def resume(out: Path) -> None:
        resumed.append((work / "step-1").read_text())
        CountingBuild()(out)

    _get(cache, resume)
    assert resumed == ["checkpoint"] and not work.exists()
    # A builder killed between the rename and the removal: the next clean-up takes the leftovers.
    work.mkdir(parents=True)
    cache.clean_tmp()
    assert not work.exists()
    with pytest.raises(ValueError, match="invalid cache key"):
        cache.work_dir("../escape")


def test_update_manifest(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    art, _ = _get(cache, CountingBuild())
    files_before = art.manifest["files"]

    merged = cache.update_manifest(art.key, {"eval": {"wikitext_ppl": 7.25, "n_ctx": 512}})
    assert merged["eval"] == {"wikitext_ppl": 7.25, "n_ctx": 512}
    on_disk = json.loads((art.path / "manifest.json").read_text())
    assert on_disk == merged
    assert on_disk["files"] == files_before
    assert on_disk["name"] == "tiny-q4"

    merged = cache.update_manifest(art.key, {"eval": {"wikitext_ppl": 7.5}, "note": "re-run"})
    assert merged["eval"] == {"wikitext_ppl": 7.5} and merged["note"] == "re-run"

    with pytest.raises(ValueError, match=r"update_manifest may not change \['files'\]"):
        cache.update_manifest(art.key, {"files": {}})
    with pytest.raises(KeyError):
        cache.update_manifest("0" * 64, {"eval": {}})

    found = cache.lookup(art.key)
    assert found is not None
    assert found.manifest == merged
    assert sorted(p.name for p in art.path.iterdir()) == ["manifest.json", "model.gguf", "tokenizer"]
    # A hit through get_or_build also returns the updated manifest.
    art2, hit = _get(cache, CountingBuild())
    assert hit and art2.manifest["note"] == "re-run"


def test_list_and_remove(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    art, _ = _get(cache, CountingBuild())
    other = cache_key(INPUTS, {**RECIPE, "quant": "Q8_0"}, TOOLS)
    cache.get_or_build(other, name="tiny-q8", recipe={}, inputs={}, tools={}, build=CountingBuild())
    listed = cache.list()
    assert sorted(a.key for a in listed) == sorted([art.key, other])
    assert {a.manifest["name"] for a in listed} == {"tiny-q4", "tiny-q8"}

    assert cache.remove(art.key) is True
    assert cache.remove(art.key) is False
    assert [a.key for a in cache.list()] == [other]
    assert cache.lookup(art.key) is None
    assert list((tmp_path / "tmp").iterdir()) == []


def test_invalid_key_rejected(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    for bad in ("../escape", "", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="invalid cache key"):
            cache.lookup(bad)


def test_dead_builders_scratch_is_removed_at_once(tmp_path: Path) -> None:
    ArtifactCache(tmp_path)
    key = cache_key(INPUTS, RECIPE, TOOLS)
    fresh = tmp_path / "tmp" / f"build-{key}-def456"  # seconds old, but nobody holds the key's lock
    discard = tmp_path / "tmp" / f"discard-seed-{key}-0123"  # e.g. the chart's seed copy: owner unknown
    stale_discard = tmp_path / "tmp" / f"discard-{key}-4567"
    other = tmp_path / "tmp" / "not-ours"
    for d in (fresh, discard, stale_discard, other):
        d.mkdir()
        (d / "model.gguf").write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(stale_discard, (old, old))

    ArtifactCache(tmp_path)
    assert not fresh.exists() and not stale_discard.exists()
    assert discard.exists() and other.exists()
    ArtifactCache(tmp_path).clean_tmp(max_age=0)
    assert not discard.exists() and other.exists()  # unknown entries are never touched


# -- two OS processes building the same key ------------------------------------------------------


def _slow_build(counter: str, out: Path) -> dict[str, int]:
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)
    (out / "model.gguf").write_bytes(PAYLOAD)
    return {"builder_pid": os.getpid()}


def _worker(root: str, counter: str, result: str, barrier: Any) -> None:
    cache = ArtifactCache(Path(root))
    barrier.wait(timeout=30)  # both processes race for the lock at the same moment
    art, hit = _get(cache, functools.partial(_slow_build, counter))
    Path(result).write_text(json.dumps({"hit": hit, "manifest": art.manifest}))


def test_concurrent_builders_in_two_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    root = tmp_path / "cache"
    counter = tmp_path / "counter.txt"
    barrier = ctx.Barrier(2)
    results = [tmp_path / f"result{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_worker, args=(str(root), str(counter), str(r), barrier)) for r in results]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0

    assert len(counter.read_text().splitlines()) == 1
    out = [json.loads(r.read_text()) for r in results]
    assert sorted(o["hit"] for o in out) == [False, True]
    assert out[0]["manifest"] == out[1]["manifest"]
    assert out[0]["manifest"]["extra"]["builder_pid"] == int(counter.read_text())
    assert list((root / "tmp").iterdir()) == []


def test_builder_that_loses_an_unlocked_race_uses_the_winners_artifact(tmp_path: Path) -> None:
    """Where file locks do not work (a shared volume mounted without them), two builders can run at once:
    the slower one's rename fails; it must take the other's verified artifact, not fail the request."""
    key = cache_key(INPUTS, RECIPE, TOOLS)
    cache, rival = ArtifactCache(tmp_path), ArtifactCache(tmp_path)

    def build_while_rival_finishes(out: Path) -> None:
        # the rival bypasses the lock, as a second pod would on a volume without working locks
        rival._build(key, name="tiny-q4", recipe=RECIPE, inputs=INPUTS, tools=TOOLS, build=CountingBuild())
        CountingBuild()(out)

    art, hit = _get(cache, build_while_rival_finishes)
    assert not hit and art.path == cache.path_for(key)
    assert (art.path / "model.gguf").read_bytes() == PAYLOAD
    assert list(cache.tmp_dir.iterdir()) == []  # our copy was discarded

    # If what the rival left does not verify, the builder says so instead of serving it.
    for name in os.listdir(cache.artifacts_dir):
        shutil.rmtree(cache.artifacts_dir / name)

    def build_while_rival_leaves_junk(out: Path) -> None:
        (cache.path_for(key)).mkdir()
        (cache.path_for(key) / "model.gguf").write_bytes(b"junk")
        CountingBuild()(out)

    with pytest.raises(OSError, match="does not verify"):
        _get(cache, build_while_rival_leaves_junk)
    assert list(cache.tmp_dir.iterdir()) == []


# -- crash hygiene: kill -9 during a build, then any lookup ----------------------------------------


def _build_then_hang(ready: str, out: Path) -> None:
    (out / "model.gguf").write_bytes(b"\0" * (1 << 20))  # a partial artifact: 1 MiB of scratch
    Path(ready).write_text(str(os.getpid()))
    time.sleep(600)


def _hanging_builder(root: str, key: str, ready: str) -> None:
    cache = ArtifactCache(Path(root))
    cache.get_or_build(key, name="hangs", recipe=RECIPE, inputs=INPUTS, tools=TOOLS,
                       build=functools.partial(_build_then_hang, ready))


def _start_hanging_build(root: Path, key: str, tmp_path: Path) -> multiprocessing.process.BaseProcess:
    ctx = multiprocessing.get_context("spawn")
    ready = tmp_path / f"ready-{key[:8]}"
    proc = ctx.Process(target=_hanging_builder, args=(str(root), key, str(ready)))
    proc.start()
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.is_alive() and time.monotonic() < deadline, "the builder never started"
        time.sleep(0.05)
    return proc


def _scratch(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "tmp").iterdir())


def _lookup_kinds(cache: ArtifactCache, key: str) -> dict[str, Any]:
    return {
        "lookup": lambda: cache.lookup(key),
        "lookup_state": lambda: cache.lookup_state(key),
        "list": lambda: cache.list(),
        "get_or_build": lambda: _get(cache, CountingBuild()),
        "other key": lambda: cache.lookup(cache_key(INPUTS, {"other": 1}, TOOLS)),
    }


@pytest.mark.parametrize("kind", ["lookup", "lookup_state", "list", "get_or_build", "other key"])
def test_kill_9_during_a_build_then_any_lookup_leaves_no_scratch(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "cache"
    key = cache_key(INPUTS, RECIPE, TOOLS)
    proc = _start_hanging_build(root, key, tmp_path)
    try:
        cache = ArtifactCache(root, clean_stale_tmp=False)
        (scratch,) = _scratch(root)
        assert scratch.startswith(f"build-{key}-")
        # The builder lives: its lock is held, so no lookup may touch its scratch.
        _lookup_kinds(cache, key)["lookup"]()
        cache.list()
        assert _scratch(root) == [scratch]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL

    cache = ArtifactCache(root, clean_stale_tmp=False)  # not cleaned by the constructor: by the lookup
    assert _scratch(root) == [scratch]
    _lookup_kinds(cache, key)[kind]()
    assert _scratch(root) == []


def test_kill_9_then_profiles_status_leaves_no_scratch(tmp_path: Path) -> None:
    """`shrinkserve profiles` (ProfileBuilder.status) is a lookup like any other."""
    from shrinkserve.compression.profiles import BaseSpec, ProfileBuilder, ProfileSpec

    root = tmp_path / "cache"
    builder = ProfileBuilder(ArtifactCache(root), {"smollm2": BaseSpec()}, {"f16": ProfileSpec(method="gguf:f16")},
                             threads=1)
    key = builder.status("f16")["key"]
    proc = _start_hanging_build(root, key, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    assert len(_scratch(root)) == 1
    assert builder.status("f16")["state"] == "missing"
    assert _scratch(root) == []


def test_own_build_scratch_survives_lookups_during_the_build(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    other = ArtifactCache(tmp_path, clean_stale_tmp=False)
    seen: list[bool] = []

    def build(out: Path) -> None:
        CountingBuild()(out)
        # Same thread (re-entrant lock), another cache object, another thread: none may clean `out`.
        cache.lookup(cache_key(INPUTS, {"nested": 1}, TOOLS))
        cache.list()
        other.lookup(cache_key(INPUTS, {"nested": 2}, TOOLS))
        t = threading.Thread(target=lambda: cache.clean_tmp())
        t.start()
        t.join()
        seen.append((out / "model.gguf").exists())

    art, hit = _get(cache, build)
    assert seen == [True] and not hit
    assert (art.path / "model.gguf").read_bytes() == PAYLOAD


# -- a damaged artifact is reported as corrupt, whoever finds it --------------------------------


def _damage(art: Artifact) -> None:
    with open(art.file("model.gguf"), "r+b") as f:
        f.truncate(7)


def test_corruption_found_by_a_status_lookup_is_counted_by_the_rebuild(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    build = CountingBuild()
    art, _ = _get(cache, build)
    _damage(art)

    assert cache.lookup_state(art.key) == (None, "corrupt")
    assert not art.path.exists()
    assert cache.lookup_state(art.key) == (None, "corrupt")  # still pending: not rebuilt, not reported
    events: list[str] = []
    rebuilt, hit = _get(cache, build, events)
    assert events == ["corrupt", "miss"] and not hit and build.calls == 2
    assert rebuilt.file("model.gguf").read_bytes() == PAYLOAD
    state = cache.lookup_state(art.key)
    assert state[1] == "cached"
    events.clear()
    _get(cache, build, events)
    assert events == ["hit"]


def _lookup_in_another_process(root: str, key: str) -> None:
    ArtifactCache(Path(root)).lookup(key)


def test_corruption_found_by_another_process_is_counted_here(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    build = CountingBuild()
    art, _ = _get(cache, build)
    _damage(art)
    proc = multiprocessing.get_context("spawn").Process(target=_lookup_in_another_process,
                                                        args=(str(tmp_path), art.key))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 0 and not art.path.exists()
    events: list[str] = []
    _get(cache, build, events)
    assert events == ["corrupt", "miss"]


def test_lookup_with_on_event_reports_and_claims(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = ArtifactCache(tmp_path)
    build = CountingBuild()
    art, _ = _get(cache, build)
    _damage(art)
    reported: list[str] = []
    with caplog.at_level(logging.WARNING, logger="shrinkserve.cache"):
        assert cache.lookup(art.key, on_event=reported.append) is None
    assert reported == ["corrupt"]
    assert any("corrupt" in r.getMessage() for r in caplog.records if r.name == "shrinkserve.cache")
    events: list[str] = []
    _get(cache, build, events)
    assert events == ["miss"]  # already reported once

    # Two discoveries before anyone reports: two events.
    for _ in range(2):
        art, _ = _get(cache, build)
        _damage(art)
        assert cache.lookup(art.key) is None
    events.clear()
    _get(cache, build, events)
    assert events == ["corrupt", "corrupt", "miss"]
