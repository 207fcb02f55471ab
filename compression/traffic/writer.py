"""Records → the current segment of a capture directory: one write() per frame on an O_APPEND descriptor,
rotation by size, retention by total bytes / number of files; never raises into serving."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shrinkserve.compression.durable import fsync_path
from shrinkserve.compression.traffic.frames import FILE_MAGIC, SEGMENT_SUFFIX, encode_frame
from shrinkserve.compression.traffic.record import CaptureRecord

log = logging.getLogger("shrinkserve.traffic")


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
            fsync_path(self._dir, directory=True)
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
