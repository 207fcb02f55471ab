"""Captured traffic as a dataset (compression/traffic/): records round-trip, a writer killed mid-append
never corrupts what was written, rotation and retention, the capture policy, the old JSONL, `capture stats`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from shrinkserve.compression.traffic.frames import FILE_MAGIC, decode_frame, encode_frame
from shrinkserve.compression.traffic.reader import ReadReport, read_records
from shrinkserve.compression.traffic.record import (
    CaptureRecord,
    TeacherIdentity,
    capture_record,
    record_from_finished,
    tokenizer_fingerprint,
)
from shrinkserve.compression.traffic.stats import capture_stats, format_stats
from shrinkserve.compression.traffic.writer import CaptureSettings, CaptureWriter
from tests.conftest import SHRINKSERVE

TEACHER = TeacherIdentity("base", "a" * 64, None, "b" * 64, "c" * 64, 49152)


def make_record(i: int, n: int = 6, k: int = 5, teacher: TeacherIdentity = TEACHER) -> CaptureRecord:
    """A record whose content is a function of i, so a reader can check every value it gets back."""
    rng = np.random.default_rng(i)
    lps = np.sort(np.log(rng.dirichlet(np.ones(40), size=n)), axis=1)[:, ::-1][:, :k]
    ids = np.stack([rng.permutation(40)[:k] for _ in range(n)])
    return capture_record(teacher, prompt_ids=list(range(i, i + 3)), completion_ids=[int(x) for x in ids[:, 0]],
                          finish_reason="stop" if i % 2 else "length",
                          params={"max_tokens": n, "temperature": 0.5, "stop": ("\n",), "seed": i},
                          sampled_logprobs=[float(x) for x in lps[:, 0] - 0.25],
                          topk=[list(zip(r.tolist(), lp.tolist(), strict=True))
                                for r, lp in zip(ids, lps, strict=True)],
                          route="/q4" if i % 3 == 0 else None, time_=1000.0 + i, meta={"i": i})


def assert_same(a: CaptureRecord, b: CaptureRecord) -> None:
    assert a.teacher == b.teacher and a.sampling == b.sampling and a.meta == b.meta
    assert (a.prompt_ids, a.completion_ids, a.finish_reason, a.time, a.top_k, a.route) == (
        b.prompt_ids, b.completion_ids, b.finish_reason, b.time, b.top_k, b.route)
    assert np.array_equal(a.topk_ids, b.topk_ids)
    assert np.array_equal(a.topk_logprobs, b.topk_logprobs)
    assert np.array_equal(a.sampled_logprobs, b.sampled_logprobs)


def writer(tmp_path: Path, **settings: object) -> CaptureWriter:
    return CaptureWriter(CaptureSettings(dir=tmp_path / "cap", **settings))  # type: ignore[arg-type]


# ------------------------------------------------------------------ the record


def test_record_round_trips_through_a_frame_and_a_file(tmp_path: Path) -> None:
    rec = make_record(3)
    frame = encode_frame(rec)
    meta_len = int.from_bytes(frame[4:8], "little")
    assert_same(decode_frame(frame[16 : 16 + meta_len], frame[16 + meta_len :]), rec)
    assert rec.sampling["stop"] == ["\n"]
    # tail mass = 1 - sum of the top-k probabilities, per token
    assert np.allclose(rec.tail_mass, 1 - np.exp(rec.topk_logprobs.astype(np.float64)).sum(1))
    w = writer(tmp_path)
    for i in range(20):
        w.record(make_record(i, n=1 + i % 7))
    w.close()
    got = list(read_records([tmp_path / "cap"]))
    assert len(got) == 20
    for i, r in enumerate(got):
        assert_same(r, make_record(i, n=1 + i % 7))
    # compact: well under the ~1 KB/token of the JSON lines it replaces
    size = sum(p.stat().st_size for p in (tmp_path / "cap").iterdir())
    assert size / sum(r.n_tokens for r in got) < 400


@dataclass
class FinishedGeneration:  # interfaces.md §1, as the server's core will hand it over
    profile: str
    prompt_ids: list[int]
    completion_ids: list[int]
    finish_reason: str
    params: object
    sampled_logprobs: list[float]
    topk: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    stop: tuple[str, ...] = ()


def test_record_from_a_finished_generation() -> None:
    fin = FinishedGeneration("base", [1, 2], [7, 9, 2], "stop", SamplingParams(3, 0.0, ("x",)), [-0.1, -3.5, -0.01],
                             [[(7, -0.1), (8, -2.5)], [(8, -0.2), (3, -2.0)], [(2, -0.01), (4, -5.0)]])
    rec = record_from_finished(fin, TEACHER, route="/torch")
    assert rec.completion_ids == [7, 9, 2] and rec.top_k == 2 and rec.route == "/torch"
    assert rec.sampling == {"max_tokens": 3, "temperature": 0.0, "stop": ["x"]}
    # the sampled token (9) is outside its position's top-k: its own logprob is kept all the same
    assert rec.sampled_logprobs[1] == pytest.approx(-3.5) and 9 not in rec.topk_ids[1]
    with pytest.raises(ValueError, match="3 completion tokens but 2 top-k rows"):
        record_from_finished(FinishedGeneration("b", [1], [1, 2, 3], "stop", None, [0.0] * 3, [[(1, 0.0)]] * 2),
                             TEACHER)


def test_tokenizer_fingerprint_identifies_the_id_to_bytes_mapping() -> None:
    pieces = [b"", b"a", b"b", b" the", b"<repo_name>"]
    assert tokenizer_fingerprint(pieces) == tokenizer_fingerprint(iter(pieces))
    assert tokenizer_fingerprint(pieces) != tokenizer_fingerprint([b"", b"b", b"a", b" the", b"<repo_name>"])
    assert tokenizer_fingerprint([b"ab", b""]) != tokenizer_fingerprint([b"a", b"b"])
    assert tokenizer_fingerprint(pieces) != tokenizer_fingerprint(pieces[:4])  # the vocabulary size counts
    # engines that write control tokens out and engines that give them no bytes agree
    assert tokenizer_fingerprint(pieces) == tokenizer_fingerprint([b"<|endoftext|>", b"a", b"b", b" the", b""])


def test_heldout_split_is_by_prompt_and_deterministic() -> None:
    from shrinkserve.compression.traffic.record import is_heldout

    recs = [make_record(i) for i in range(400)]
    held = [is_heldout(r, 0.2) for r in recs]
    assert 50 < sum(held) < 110  # about a fifth
    assert held == [is_heldout(r, 0.2) for r in recs]
    assert all(is_heldout(make_record(i), 0.2) == held[i] for i in (3, 7, 11))  # same prompt, same side
    assert not any(is_heldout(r, 0.0) for r in recs) and all(is_heldout(r, 1.0) for r in recs)
    assert [is_heldout(r, 0.2, salt="other") for r in recs] != held


# ------------------------------------------------------------------ crash safety

def test_a_torn_last_record_is_skipped_at_every_cut(tmp_path: Path) -> None:
    w = writer(tmp_path)
    for i in range(3):
        w.record(make_record(i))
    path = w.current
    w.close()
    assert path is not None
    data = path.read_bytes()
    last = len(encode_frame(make_record(2)))
    for cut in [1, 3, 4, 10, 16, 17, last // 2, last - 1]:
        torn = tmp_path / f"torn-{cut}.sscap"
        torn.write_bytes(data[: len(data) - cut])
        report = ReadReport()
        got = list(read_records([torn], report=report))
        assert len(got) == 2 and report.torn == 1 and report.corrupt == 0, (cut, report)
        assert_same(got[1], make_record(1))


def test_a_corrupt_frame_in_the_middle_is_skipped_and_reading_resyncs(tmp_path: Path) -> None:
    w = writer(tmp_path)
    for i in range(4):
        w.record(make_record(i))
    path = w.current
    w.close()
    assert path is not None
    data = bytearray(path.read_bytes())
    second = len(FILE_MAGIC) + len(encode_frame(make_record(0)))
    data[second + 40] ^= 0xFF  # a flipped bit inside record 1's metadata
    path.write_bytes(bytes(data))
    report = ReadReport()
    got = list(read_records([path], report=report))
    assert [r.meta["i"] for r in got] == [0, 2, 3] and report.corrupt == 1 and report.torn == 0


WRITER_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_traffic import make_record
    from shrinkserve.compression.traffic.writer import CaptureSettings, CaptureWriter
    torn_at = {torn_at}
    if torn_at is not None:
        real_write = os.write
        def write(fd, data):
            if len(data) > 100 and write.calls == torn_at:  # this record's frame: half of it, then die
                real_write(fd, bytes(data[: len(data) // 2]))
                os.kill(os.getpid(), signal.SIGKILL)
            write.calls += len(data) > 100
            return real_write(fd, data)
        write.calls = 0
        os.write = write
    w = CaptureWriter(CaptureSettings(dir=Path({dir!r}), max_file_bytes=2_000_000))
    i = 0
    while True:
        w.record(make_record(i, n=400, k=50))  # ~160 KB per record
        print(i, flush=True)
        i += 1
""")


def run_writer(cap: Path, *, torn_at: int | None = None, kill_after: int | None = None) -> int:
    """A writer process killed with SIGKILL: by itself half-way through writing record `torn_at`, or from
    outside after it reported `kill_after` records. Returns how many records it reported written."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    script = WRITER_SCRIPT.format(tests=str(Path(__file__).parent), dir=str(cap), torn_at=torn_at)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    reported = 0
    if kill_after is not None:
        while reported < kill_after:
            assert proc.stdout.readline(), "writer died"
            reported += 1
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    return reported + len(out.split())


def test_records_survive_a_writer_killed_mid_append(tmp_path: Path) -> None:
    cap = tmp_path / "cap"
    written = [run_writer(cap, torn_at=7), run_writer(cap, kill_after=5), run_writer(cap, torn_at=0),
               run_writer(cap, kill_after=12)]
    assert written[0] == 7 and written[2] == 0
    report = ReadReport()
    got = list(read_records([cap], report=report))
    # The two writers killed inside a write left one torn record each, skipped; everything else is there,
    # exactly as written (a writer killed from outside may have finished one more write than it reported).
    assert report.torn == 2 and report.corrupt == 0, report
    assert written[0] + written[1] + written[3] <= len(got) <= sum(written) + 2
    for rec in got:
        assert_same(rec, make_record(rec.meta["i"], n=400, k=50))
    runs = [[r.meta["i"] for r in read_records([s])] for s in sorted(cap.iterdir())]
    assert [len(r) for r in runs][:1] == [7] and runs[2] == []  # the torn writers' segments
    for run in runs:
        assert run == list(range(len(run)))  # no gaps, no duplicates, in order
    # A new writer never appends behind a torn tail: it opens a segment of its own.
    w = CaptureWriter(CaptureSettings(dir=cap))
    w.record(make_record(99))
    w.close()
    assert [r.meta["i"] for r in read_records([cap])][-1] == 99


# ------------------------------------------------------------------ rotation, retention, policy

def test_rotation_by_size_keeps_every_record_in_order(tmp_path: Path) -> None:
    w = writer(tmp_path, max_file_bytes=8192, retain_bytes=None)
    for i in range(30):
        w.record(make_record(i, n=10))
    w.close()
    segs = sorted((tmp_path / "cap").iterdir())
    assert len(segs) >= 3
    assert all(s.stat().st_size <= 8192 for s in segs)
    assert [r.meta["i"] for r in read_records([tmp_path / "cap"])] == list(range(30))


def test_retention_deletes_the_oldest_segments(tmp_path: Path) -> None:
    w = writer(tmp_path, max_file_bytes=8192, retain_files=2)
    for i in range(40):
        w.record(make_record(i, n=10))
    w.close()
    segs = sorted((tmp_path / "cap").iterdir())
    assert len(segs) == 2
    kept = [r.meta["i"] for r in read_records([tmp_path / "cap"])]
    assert kept == list(range(kept[0], 40)) and kept[0] > 0  # the newest survive, in order

    w = writer(tmp_path, max_file_bytes=8192, retain_bytes=20_000)
    for i in range(40):
        w.record(make_record(i, n=10))
    w.close()
    assert sum(s.stat().st_size for s in (tmp_path / "cap").iterdir()) <= 20_000 + 8192


def test_capture_policy_teachers_by_default_with_opt_outs() -> None:
    @dataclass
    class Spec:
        is_teacher: bool = False
        capture: bool | None = None

    profiles = {"teacher": Spec(is_teacher=True), "plain": Spec(), "opt-in": Spec(capture=True),
                "teacher-opt-out": Spec(is_teacher=True, capture=False)}
    off = CaptureWriter(CaptureSettings(), profiles)
    assert not off.wants("teacher")
    w = CaptureWriter(CaptureSettings(dir=Path("/nonexistent/never-created"), exclude_routes=["/private"]), profiles)
    assert [w.wants(p) for p in profiles] == [True, False, True, False]
    assert not w.wants("teacher", route="/private") and not w.wants("teacher", route="private/deeper")
    assert w.wants("teacher", route="/privateer")
    listed = CaptureWriter(CaptureSettings(dir=Path("/x"), profiles=["plain", "teacher-opt-out"]), profiles)
    assert [listed.wants(p) for p in profiles] == [False, True, False, False]


def test_io_errors_drop_records_but_never_raise(tmp_path: Path) -> None:
    blocker = tmp_path / "cap"
    blocker.write_text("a file where the directory should be")
    w = writer(tmp_path)
    w.record(make_record(0))
    assert w.dropped == 1 and w.written == 0
    w.close()


# ------------------------------------------------------------------ readers

def legacy_line(i: int, text: str = "hello") -> str:
    return json.dumps({"time": 1.0 + i, "profile": "base", "finish_reason": "stop", "prompt_ids": [1, 2],
                       "completion_ids": [5, 6], "text": f"{text} {i}", "prompt_chars": 5,
                       "teacher_topk": [[[5, -0.1], [7, -2.5]], [[8, -0.3], [9, -1.5]]]})


def test_the_old_jsonl_is_read(tmp_path: Path) -> None:
    old = tmp_path / "capture.jsonl"
    old.write_text("\n".join(legacy_line(i) for i in range(3)) + "\n" + legacy_line(3)[:50])  # torn last line
    report = ReadReport()
    got = list(read_records([old], report=report))
    assert len(got) == 3 and report.torn == 1
    rec = got[0]
    assert rec.teacher.profile == "base" and rec.teacher.tokenizer_sha256 is None and rec.text == "hello 0"
    assert rec.topk_ids.tolist() == [[5, 7], [8, 9]]
    # the sampled token's logprob: known where it is in the top-k (5), unknown where it is not (6)
    assert rec.sampled_logprobs[0] == pytest.approx(-0.1) and np.isnan(rec.sampled_logprobs[1])
    assert capture_stats([old]).unknown_sampled == 3


def test_calibration_reads_capture_directories_and_the_old_jsonl(tmp_path: Path) -> None:
    from shrinkserve.compression.calibration import calibration_text

    class Tok:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return " ".join(f"t{i}" for i in ids)

    w = writer(tmp_path)
    w.record(make_record(1))
    w.close()
    expected = "t1 t2 t3 " + " ".join(f"t{i}" for i in make_record(1).completion_ids)
    assert calibration_text(tmp_path / "cap", Tok()) == expected
    with pytest.raises(ValueError, match="needs a tokenizer"):
        calibration_text(tmp_path / "cap")
    old = tmp_path / "old.jsonl"
    old.write_text(legacy_line(0, "calibrate me") + "\n")
    assert calibration_text(old) == "calibrate me 0"


def test_capture_stats_command(tmp_path: Path) -> None:
    w = writer(tmp_path)
    for i in range(5):
        w.record(make_record(i, n=4))
    w.close()
    stats = capture_stats([tmp_path / "cap"])
    assert (stats.records, stats.tokens, stats.prompt_tokens, sum(stats.tail_counts)) == (5, 20, 15, 20)
    assert "records 5" in format_stats(stats)
    png = tmp_path / "tail.png"
    out = subprocess.run([*SHRINKSERVE, "capture", "stats", str(tmp_path / "cap"), "--plot", str(png)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "records 5  tokens 20" in out.stdout and "tail mass" in out.stdout and png.stat().st_size > 1000
    lines = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("[")]
    assert len(lines) == 7 and sum(int(ln.split(")")[1].split()[0].replace(",", "")) for ln in lines) == 20
    missing = subprocess.run([*SHRINKSERVE, "capture", "stats", str(tmp_path / "nope")], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
