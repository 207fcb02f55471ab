"""Captured traffic as a dataset: one `CaptureRecord` per finished generation, in compact append-only files.

Why: a student is distilled on the teacher's output distributions (logit matching beats copying text),
and AWQ/GPTQ can calibrate on what users send. So each record names its teacher (artifact key / weights
hash, tokenizer hash, chat-template hash, vocab size), the sampling parameters, and per generated token
the teacher's top-k ids + logprobs and the sampled token's own logprob (also when it is outside the top-k).

Storage (format 1). A capture directory holds segment files `capture-<time_ns>-<pid>.sscap`:

    file   := FILE_MAGIC (8 bytes) frame*
    frame  := b"SSRC" | u32 meta_len | u32 body_len | u32 crc32(lengths + meta + body) | meta | body
    meta   := UTF-8 JSON: teacher, sampling, finish_reason, time, top_k, route, meta, n_prompt, n, k
    body   := int32 prompt_ids[n_prompt] | int32 completion_ids[n] | int32 topk_ids[n, k]
              | float32 topk_logprobs[n, k] | float32 sampled_logprobs[n]        (little-endian)

About 8k + 8 bytes per generated token (168 at k = 20; 173 measured with 100-token answers, where the
older JSONL took 388 for the same records).
Crash safety: a frame is written with one write() on an O_APPEND descriptor, so a killed writer leaves at
most one torn frame, at the end of its own segment; a writer never appends to a segment it did not
create (each process opens a fresh one), and the reader skips a torn or corrupt frame (CRC) and resyncs on
the next frame magic. Rotation by size, retention by total bytes / number of files, oldest first.
The older JSONL (one file, the server's capture before this format) is read as well (no sampled logprobs
where the token fell outside its top-k: NaN; `text` kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import mmap
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("shrinkserve.traffic")

FILE_MAGIC = b"SSCAPT\x00\x01"  # "shrinkserve capture", format 1
FRAME_MAGIC = b"SSRC"
_FRAME = struct.Struct("<4sIII")
SEGMENT_SUFFIX = ".sscap"
_MAX_META = 16 * 2**20  # larger lengths in a frame header are corruption, not data


# ------------------------------------------------------------------------------ the record
@dataclass(frozen=True)
class TeacherIdentity:
    """Which model produced the distributions; a student's trainer checks it before reading ids."""

    profile: str
    artifact_key: str | None = None  # cache key of the served artifact
    weights_sha256: str | None = None  # content hash when the profile serves a source as is
    tokenizer_sha256: str | None = None  # see tokenizer_fingerprint(); None only in legacy records
    chat_template_sha256: str | None = None
    vocab_size: int | None = None


@dataclass
class CaptureRecord:
    """One finished generation with the teacher's per-token distributions (interfaces.md §3)."""

    teacher: TeacherIdentity
    sampling: dict[str, Any]
    prompt_ids: list[int]
    completion_ids: list[int]  # every sampled token incl. a final EOS (legacy records: without the EOS)
    finish_reason: str
    time: float
    top_k: int
    topk_ids: np.ndarray  # int32 [n, k], best first
    topk_logprobs: np.ndarray  # float32 [n, k]
    sampled_logprobs: np.ndarray  # float32 [n]: the sampled token's own logprob (NaN: unknown, legacy only)
    route: str | None = None
    text: str | None = None  # legacy records only: the rendered prompt + completion text
    # Provenance beyond the serving route, e.g. synthetic data: {"source": "synthetic", "prompt_id": ...}.
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, k = len(self.completion_ids), self.top_k
        self.topk_ids = np.asarray(self.topk_ids, dtype=np.int32).reshape(n, k)
        self.topk_logprobs = np.asarray(self.topk_logprobs, dtype=np.float32).reshape(n, k)
        self.sampled_logprobs = np.asarray(self.sampled_logprobs, dtype=np.float32).reshape(n)

    @property
    def n_tokens(self) -> int:
        return len(self.completion_ids)

    @property
    def tail_mass(self) -> np.ndarray:
        """Per token, the probability outside the top-k: 1 − Σ exp(top-k logprobs) (float64, ≥ 0)."""
        return np.clip(1.0 - np.exp(self.topk_logprobs.astype(np.float64)).sum(axis=1), 0.0, 1.0)


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


_SPECIAL_LOOKING = re.compile(rb"<[^\s<>]{1,64}>")


def tokenizer_fingerprint(pieces: Iterable[bytes], eos_token_ids: Iterable[int] = ()) -> str:
    """sha256 over the output bytes of every ordinary token id: the id ↔ text mapping a reader needs to
    interpret captured ids.

    Engines disagree on control tokens: llama.cpp gives `<repo_name>` and its kin no bytes and counts 3
    ids as end-of-generation, the PyTorch engine writes them out and knows 1 EOS (SmolLM2, measured). So
    empty pieces and special-looking ones (`<...>` without spaces) are left out, and so are the EOS ids
    (kept for the signature's sake): the same model then has the same fingerprint whichever engine serves it.
    """
    del eos_token_ids
    h = hashlib.sha256()
    n = 0
    for i, piece in enumerate(pieces):
        n = i + 1
        if not piece or _SPECIAL_LOOKING.fullmatch(piece):
            continue
        h.update(struct.pack("<II", i, len(piece)))
        h.update(piece)
    h.update(struct.pack("<I", n))
    return h.hexdigest()


def served_teacher(
    profile: str, built: Any, *, token_bytes: Callable[[int], bytes], vocab_size: int, eos_token_ids: Iterable[int],
    chat_template: str | None,
) -> TeacherIdentity:
    """The identity of a served profile, once per load: `built` is its BuiltProfile (artifact key, or the
    content hash of a source served as is: hashed here when nobody has yet); the rest is the engine's
    tokenizer (`token_bytes(i)` for every id, EOS ids, chat template)."""
    from shrinkserve.compression.cache import hash_path

    weights = None
    if built.key is None:
        weights = getattr(built, "source_digest", None) or hash_path(Path(built.path))
    return TeacherIdentity(
        profile=profile, artifact_key=built.key, weights_sha256=weights,
        tokenizer_sha256=tokenizer_fingerprint((token_bytes(i) for i in range(vocab_size)), eos_token_ids),
        chat_template_sha256=sha256_text(chat_template), vocab_size=vocab_size)


def _sampling_dict(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        raw = dataclasses.asdict(params)
    elif isinstance(params, BaseModel):
        raw = params.model_dump()
    elif isinstance(params, Mapping):
        raw = dict(params)
    else:
        raw = dict(vars(params))
    return json.loads(json.dumps(raw, default=list))  # tuples → lists; anything odd fails loudly


def capture_record(
    teacher: TeacherIdentity, *, prompt_ids: Sequence[int], completion_ids: Sequence[int], finish_reason: str,
    params: Any, sampled_logprobs: Sequence[float], topk: Sequence[Sequence[tuple[int, float]]],
    route: str | None = None, time_: float | None = None, meta: Mapping[str, Any] | None = None,
) -> CaptureRecord:
    """A record from the fields of a finished generation (interfaces.md §1 `FinishedGeneration`)."""
    n = len(completion_ids)
    if len(topk) != n or len(sampled_logprobs) != n:
        raise ValueError(f"{n} completion tokens but {len(topk)} top-k rows and {len(sampled_logprobs)} logprobs")
    k = len(topk[0]) if n else 0
    if any(len(row) != k for row in topk):
        raise ValueError("top-k rows differ in length")
    ids = np.array([[t for t, _ in row] for row in topk], dtype=np.int32).reshape(n, k)
    lps = np.array([[lp for _, lp in row] for row in topk], dtype=np.float32).reshape(n, k)
    return CaptureRecord(teacher, _sampling_dict(params), [int(t) for t in prompt_ids],
                         [int(t) for t in completion_ids], str(finish_reason),
                         time.time() if time_ is None else time_, k, ids, lps,
                         np.asarray(sampled_logprobs, dtype=np.float32), route, meta=dict(meta or {}))


def record_from_finished(fin: Any, teacher: TeacherIdentity, *, route: str | None = None) -> CaptureRecord:
    """A record from a `FinishedGeneration` (or anything with its attributes)."""
    return capture_record(teacher, prompt_ids=fin.prompt_ids, completion_ids=fin.completion_ids,
                          finish_reason=fin.finish_reason, params=fin.params, sampled_logprobs=fin.sampled_logprobs,
                          topk=fin.topk, route=route)


def decode_record(rec: CaptureRecord, tokenizer: Any) -> str:
    """Prompt + completion as text (special tokens written out), with an HF tokenizer."""
    if rec.text is not None:
        return rec.text
    return str(tokenizer.decode(rec.prompt_ids + rec.completion_ids, skip_special_tokens=False))


def is_heldout(rec: CaptureRecord, fraction: float, salt: str = "") -> bool:
    """A deterministic train / held-out split by prompt: the same prompt ids always fall on the same side
    (a repeated prompt cannot leak into both), whatever the order or the number of records."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"held-out fraction {fraction} is not within [0, 1]")
    h = hashlib.sha256(salt.encode() + np.asarray(rec.prompt_ids, dtype="<i4").tobytes()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < fraction


# ------------------------------------------------------------------------------ frames
def encode_frame(rec: CaptureRecord) -> bytes:
    n, k = rec.n_tokens, rec.top_k
    meta = {"teacher": dataclasses.asdict(rec.teacher), "sampling": rec.sampling, "finish_reason": rec.finish_reason,
            "time": rec.time, "top_k": k, "route": rec.route, "n_prompt": len(rec.prompt_ids), "n": n, "k": k,
            "meta": rec.meta}
    meta_b = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode("utf-8")
    body = b"".join([
        np.asarray(rec.prompt_ids, dtype="<i4").tobytes(), np.asarray(rec.completion_ids, dtype="<i4").tobytes(),
        rec.topk_ids.astype("<i4", copy=False).tobytes(), rec.topk_logprobs.astype("<f4", copy=False).tobytes(),
        rec.sampled_logprobs.astype("<f4", copy=False).tobytes(),
    ])
    lengths = struct.pack("<II", len(meta_b), len(body))
    crc = zlib.crc32(body, zlib.crc32(meta_b, zlib.crc32(lengths)))
    return _FRAME.pack(FRAME_MAGIC, len(meta_b), len(body), crc) + meta_b + body


def decode_frame(meta_b: bytes | memoryview, body: bytes | memoryview) -> CaptureRecord:
    meta = json.loads(bytes(meta_b))
    n_p, n, k = int(meta["n_prompt"]), int(meta["n"]), int(meta["k"])
    arr = np.frombuffer(body, dtype=np.uint8)
    sizes = [n_p * 4, n * 4, n * k * 4, n * k * 4, n * 4]
    if sum(sizes) != len(arr):
        raise ValueError(f"body has {len(arr)} bytes, the header says {sum(sizes)}")
    parts, at = [], 0
    for size, dtype in zip(sizes, ["<i4", "<i4", "<i4", "<f4", "<f4"], strict=True):
        parts.append(arr[at : at + size].view(dtype))
        at += size
    return CaptureRecord(
        TeacherIdentity(**meta["teacher"]), meta["sampling"], parts[0].astype(int).tolist(),
        parts[1].astype(int).tolist(), meta["finish_reason"], float(meta["time"]), k,
        parts[2].astype(np.int32).reshape(n, k), parts[3].astype(np.float32).reshape(n, k),
        parts[4].astype(np.float32), meta.get("route"), meta=meta.get("meta") or {})


@dataclass
class ReadReport:
    """What a reader skipped: torn tails (a writer killed mid-append) and corrupt frames (CRC)."""

    files: int = 0
    bytes: int = 0
    records: int = 0
    torn: int = 0
    corrupt: int = 0
    skipped_bytes: int = 0
    problems: list[str] = field(default_factory=list)


def is_capture_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(FILE_MAGIC)) == FILE_MAGIC
    except OSError:
        return False


def _iter_segment(path: Path, report: ReadReport) -> Iterator[CaptureRecord]:
    size = path.stat().st_size
    report.bytes += size
    if size <= len(FILE_MAGIC):
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            pos = len(FILE_MAGIC)
            while pos < size:
                lengths, end = _try_frame(view, pos, size)
                if lengths is not None:
                    meta_end = pos + _FRAME.size + lengths[0]
                    try:
                        yield decode_frame(view[pos + _FRAME.size : meta_end], view[meta_end:end])
                        report.records += 1
                    except (ValueError, KeyError, TypeError) as exc:  # CRC passed but content is not ours
                        report.corrupt += 1
                        report.problems.append(f"{path}@{pos}: {exc}")
                    pos = end
                    continue
                nxt = _next_valid(mm, view, pos + 1, size)
                if nxt == -1 and end == -1:  # the last frame runs past the end: a writer killed mid-append
                    report.torn += 1
                    report.skipped_bytes += size - pos
                    report.problems.append(f"{path}@{pos}: torn last record ({size - pos} bytes) skipped")
                    return
                stop = size if nxt == -1 else nxt
                report.corrupt += 1
                report.skipped_bytes += stop - pos
                report.problems.append(f"{path}@{pos}: corrupt frame, {stop - pos} bytes skipped")
                pos = stop
        finally:
            view.release()


def _next_valid(mm: mmap.mmap, view: memoryview, start: int, size: int) -> int:
    """Offset of the next valid frame at or after `start`, or -1."""
    pos = mm.find(FRAME_MAGIC, start)
    while pos != -1:
        if _try_frame(view, pos, size)[0] is not None:
            return pos
        pos = mm.find(FRAME_MAGIC, pos + 1)
    return -1


def _try_frame(view: memoryview, pos: int, size: int) -> tuple[tuple[int, int] | None, int]:
    """((meta_len, body_len), end) for a valid frame at `pos`; otherwise (None, -1) when what is there
    could be the start of a frame cut off by the end of the file, else (None, 0)."""
    if size - pos < _FRAME.size:
        return None, -1 if FRAME_MAGIC.startswith(bytes(view[pos : min(size, pos + 4)])) else 0
    magic, meta_len, body_len, crc = _FRAME.unpack_from(view, pos)
    if magic != FRAME_MAGIC or meta_len > _MAX_META:
        return None, 0
    end = pos + _FRAME.size + meta_len + body_len
    if end > size:
        return None, -1
    lengths = struct.pack("<II", meta_len, body_len)
    meta = view[pos + _FRAME.size : pos + _FRAME.size + meta_len]
    body = view[pos + _FRAME.size + meta_len : end]
    if zlib.crc32(body, zlib.crc32(meta, zlib.crc32(lengths))) != crc:
        return None, 0
    return (meta_len, body_len), end


def _iter_jsonl(path: Path, report: ReadReport, strict: bool) -> Iterator[CaptureRecord]:
    """The older JSONL capture (the server's before this format): {time, profile, finish_reason, prompt_ids,
    completion_ids, text, prompt_chars, teacher_topk: [[[id, logprob], ...] per generated token]}."""
    report.bytes += path.stat().st_size
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                topk = raw["teacher_topk"]
                completion = [int(t) for t in raw["completion_ids"]]
                k = len(topk[0]) if topk else 0
                sampled = [next((lp for i, lp in row if i == tok), float("nan")) for tok, row in zip(completion, topk,
                                                                                                     strict=True)]
                rec = CaptureRecord(
                    TeacherIdentity(profile=str(raw["profile"])), {}, [int(t) for t in raw["prompt_ids"]], completion,
                    str(raw.get("finish_reason")), float(raw["time"]), k,
                    np.array([[i for i, _ in row] for row in topk], dtype=np.int32).reshape(len(topk), k),
                    np.array([[lp for _, lp in row] for row in topk], dtype=np.float32).reshape(len(topk), k),
                    np.asarray(sampled, dtype=np.float32), text=str(raw["text"]))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                if strict:
                    raise ValueError(f"{path}:{n}: not a captured-traffic record ({exc})") from exc
                if not line.endswith("\n"):  # the last line of a file whose writer died mid-line
                    report.torn += 1
                else:
                    report.corrupt += 1
                report.problems.append(f"{path}:{n}: skipped ({exc})")
                continue
            report.records += 1
            yield rec


def capture_files(paths: Iterable[Path | str]) -> list[Path]:
    """Files to read, in order: each given file, and each directory's segments and .jsonl files by name."""
    out: list[Path] = []
    for p in map(Path, paths):
        p = p.expanduser()
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.is_file() and q.suffix in (SEGMENT_SUFFIX, ".jsonl")))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"capture path {p} does not exist")
    return out


def read_records(
    paths: Iterable[Path | str], *, strict: bool = False, report: ReadReport | None = None,
) -> Iterator[CaptureRecord]:
    """Every record of the given capture files / directories (also legacy JSONL), in file order.

    Torn or corrupt frames are skipped and counted in `report`; `strict` makes a malformed JSONL line an
    error instead (calibration uses it to refuse a file that is not a capture).
    """
    report = report if report is not None else ReadReport()
    for path in capture_files(paths):
        report.files += 1
        if is_capture_file(path):
            yield from _iter_segment(path, report)
        else:
            yield from _iter_jsonl(path, report, strict)
    for problem in report.problems[-5:]:
        log.warning("%s", problem)


# ------------------------------------------------------------------------------ settings and writer
class CaptureSettings(BaseModel):
    """Traffic capture (`capture:` in the config). Off unless `dir` is set."""

    model_config = ConfigDict(extra="forbid")

    dir: Path | None = Field(default=None, description="directory of capture segment files; unset = no capture")
    top_k: int = Field(default=20, ge=1, le=100, description="teacher logprobs kept per generated token")
    profiles: list[str] = Field(default_factory=list,
                                description="profiles to capture; empty = those marked `is_teacher: true`")
    exclude_routes: list[str] = Field(default_factory=list, description="route prefixes never captured")
    max_file_bytes: int = Field(default=64 * 2**20, ge=4096, description="a segment is closed past this size")
    retain_bytes: int | None = Field(default=2 * 2**30, ge=4096,
                                     description="oldest segments are deleted past this total; None = keep all")
    retain_files: int | None = Field(default=None, ge=1, description="most segments kept; None = no limit")
    fsync: bool = Field(default=False, description="fsync after every record (survives power loss, not only "
                                                   "a crash; costs one disk flush per generation)")

    @model_validator(mode="before")
    @classmethod
    def _no_jsonl_file(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "file" in data:
            raise ValueError("capture.file (one JSONL file) was replaced by capture.dir (a directory of capture "
                             "segments); existing JSONL captures are still read by every reader")
        return data


class CaptureWriter:
    """Appends records to the current segment of `settings.dir`; thread-safe; never raises into serving.

    `profiles` maps profile names to their specs (anything with `.is_teacher` and `.capture`), for the
    "teacher profiles by default, per-profile opt-in/out" rule of `wants`.
    """

    def __init__(self, settings: CaptureSettings, profiles: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.profiles = dict(profiles or {})
        self.dropped = 0  # records lost to I/O errors (logged)
        self.written = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._dir = settings.dir.expanduser() if settings.dir is not None else None

    # ---------------------------------------------------------------- policy
    def wants(self, profile: str, route: str | None = None) -> bool:
        s = self.settings
        if self._dir is None:
            return False
        if route is not None:
            clean = "/" + route.strip("/")
            if any(clean == "/" + r.strip("/") or clean.startswith("/" + r.strip("/") + "/") for r in s.exclude_routes):
                return False
        spec = self.profiles.get(profile)
        explicit = getattr(spec, "capture", None)
        if explicit is False:
            return False
        if s.profiles:
            return profile in s.profiles
        return bool(explicit or getattr(spec, "is_teacher", False))

    # ---------------------------------------------------------------- writing
    @property
    def current(self) -> Path | None:
        return self._path

    def record(self, rec: CaptureRecord) -> None:
        frame = encode_frame(rec)
        with self._lock:
            try:
                if self._fd is not None and self._size > len(FILE_MAGIC) and \
                        self._size + len(frame) > self.settings.max_file_bytes:
                    self._close_segment()
                if self._fd is None:
                    self._open_segment()
                assert self._fd is not None
                _write_all(self._fd, frame)
                self._size += len(frame)
                if self.settings.fsync:
                    os.fsync(self._fd)
                self.written += 1
            except OSError as exc:
                self.dropped += 1
                log.warning("capture record dropped (%s); %d dropped so far", exc, self.dropped)
                self._close_segment(quiet=True)

    def close(self) -> None:
        with self._lock:
            self._close_segment(quiet=True)

    def _open_segment(self) -> None:
        assert self._dir is not None
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"capture-{time.time_ns():020d}-{os.getpid()}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        try:
            _write_all(fd, FILE_MAGIC)
            os.fsync(fd)
            _fsync_dir(self._dir)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._path, self._size = fd, path, len(FILE_MAGIC)
        self._enforce_retention()

    def _close_segment(self, quiet: bool = False) -> None:
        if self._fd is None:
            return
        fd, self._fd, self._path = self._fd, None, None
        try:
            os.fsync(fd)
        except OSError:
            if not quiet:
                raise
        finally:
            os.close(fd)

    def _enforce_retention(self) -> None:
        """Delete the oldest segments (never the one being written) past `retain_bytes` / `retain_files`."""
        assert self._dir is not None
        s = self.settings
        segs = sorted(p for p in self._dir.glob(f"capture-*{SEGMENT_SUFFIX}") if p != self._path)
        sizes = {}
        for p in segs:
            with contextlib.suppress(FileNotFoundError):
                sizes[p] = p.stat().st_size
        segs = [p for p in segs if p in sizes]
        total = sum(sizes.values()) + self._size
        count = len(segs) + 1
        for p in segs:
            over_bytes = s.retain_bytes is not None and total > s.retain_bytes
            over_files = s.retain_files is not None and count > s.retain_files
            if not (over_bytes or over_files):
                break
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                log.info("capture retention: deleted %s (%d bytes)", p.name, sizes[p])
            total -= sizes[p]
            count -= 1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ stats
TAIL_BINS = (0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class CaptureStats:
    files: int
    bytes: int
    records: int
    prompt_tokens: int
    tokens: int
    torn: int
    corrupt: int
    tail_bins: tuple[float, ...]
    tail_counts: list[int]
    tail_mean: float
    tail_median: float
    unknown_sampled: int  # tokens whose sampled logprob is unknown (legacy records)
    by_teacher: dict[str, int]
    finish_reasons: dict[str, int]
    top_k: list[int]


def capture_stats(paths: Iterable[Path | str], progress: Callable[[int], None] | None = None) -> CaptureStats:
    report = ReadReport()
    counts = np.zeros(len(TAIL_BINS) - 1, dtype=np.int64)
    tails: list[np.ndarray] = []
    records = prompt = tokens = unknown = 0
    by_teacher: dict[str, int] = {}
    finish: dict[str, int] = {}
    ks: set[int] = set()
    for rec in read_records(paths, report=report):
        records += 1
        prompt += len(rec.prompt_ids)
        tokens += rec.n_tokens
        unknown += int(np.isnan(rec.sampled_logprobs).sum())
        tail = rec.tail_mass
        counts += np.histogram(tail, bins=TAIL_BINS)[0]
        tails.append(tail)
        by_teacher[rec.teacher.profile] = by_teacher.get(rec.teacher.profile, 0) + 1
        finish[rec.finish_reason] = finish.get(rec.finish_reason, 0) + 1
        ks.add(rec.top_k)
        if progress:
            progress(1)
    all_tails = np.concatenate(tails) if tails else np.zeros(0)
    return CaptureStats(report.files, report.bytes, records, prompt, tokens, report.torn, report.corrupt, TAIL_BINS,
                        counts.tolist(), float(all_tails.mean()) if len(all_tails) else float("nan"),
                        float(np.median(all_tails)) if len(all_tails) else float("nan"), unknown, by_teacher, finish,
                        sorted(ks))


def format_stats(st: CaptureStats, width: int = 40) -> str:
    per_token = f"  bytes/token {st.bytes / st.tokens:.0f}" if st.tokens else ""
    lines = [f"files {st.files}  bytes {st.bytes:,}  records {st.records:,}  tokens {st.tokens:,} "
             f"(prompt tokens {st.prompt_tokens:,}){per_token}",
             f"top-k {', '.join(map(str, st.top_k)) or '-'}  teachers {st.by_teacher or '-'}  "
             f"finish {st.finish_reasons or '-'}"]
    if st.torn or st.corrupt:
        lines.append(f"skipped: {st.torn} torn record(s), {st.corrupt} corrupt frame(s)")
    if st.unknown_sampled:
        lines.append(f"{st.unknown_sampled} token(s) without a sampled logprob (legacy records, token outside top-k)")
    lines.append(f"tail mass 1 − Σ top-k per token: mean {st.tail_mean:.4f}, median {st.tail_median:.4f}")
    peak = max(st.tail_counts) if st.tail_counts and max(st.tail_counts) else 1
    for lo, hi, c in zip(st.tail_bins[:-1], st.tail_bins[1:], st.tail_counts, strict=True):
        share = c / st.tokens if st.tokens else 0.0
        lines.append(f"  [{lo:<5g}, {hi:<5g}) {c:>10,} {share:6.1%} {'█' * round(width * c / peak)}")
    return "\n".join(lines)


def plot_tail_histogram(paths: Iterable[Path | str], out: Path) -> Path:
    """A PNG of the per-token tail-mass distribution (log-spaced bins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tails = [rec.tail_mass for rec in read_records(paths)]
    data = np.concatenate(tails) if tails else np.zeros(0)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.concatenate([[0.0], np.logspace(-5, 0, 41)])
    ax.hist(np.maximum(data, 1e-6), bins=bins)
    ax.set_xscale("log")
    ax.set_xlabel("tail mass 1 − Σ top-k (per generated token)")
    ax.set_ylabel("tokens")
    ax.set_title(f"captured traffic: {len(data):,} tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
