"""Capture files → records: segment files (a torn tail or a corrupt frame is skipped, counted, and the reader
resyncs on the next frame) and the older JSONL capture."""

from __future__ import annotations

import json
import logging
import mmap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shrinkserve.compression.traffic.frames import (
    FILE_MAGIC,
    FRAME_HEADER,
    FRAME_MAGIC,
    SEGMENT_SUFFIX,
    check_frame,
    decode_frame,
)
from shrinkserve.compression.traffic.record import CaptureRecord, TeacherIdentity

log = logging.getLogger("shrinkserve.traffic")


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
                lengths, end = check_frame(view, pos, size)
                if lengths is not None:
                    meta_end = pos + FRAME_HEADER.size + lengths[0]
                    try:
                        yield decode_frame(view[pos + FRAME_HEADER.size : meta_end], view[meta_end:end])
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
        if check_frame(view, pos, size)[0] is not None:
            return pos
        pos = mm.find(FRAME_MAGIC, pos + 1)
    return -1



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
