"""Content-addressed on-disk cache for compressed model artifacts.

Layout under ``root``::

    artifacts/<key>/   finished artifacts: the files written by the build + manifest.json
    tmp/               build scratch and directories being deleted
    work/<key>/        a build's own state that must outlive a killed build (a student's training
                       checkpoints: the next build of the key resumes from them); removed once the
                       artifact exists
    locks/<key>.lock   per-key file locks (never deleted: removing a lock file others may hold is racy)
    corrupt/<key>.*    one marker per damaged artifact discarded and not yet reported (see below)

An artifact directory only ever appears through an atomic ``os.rename`` of a complete, fsynced
temp directory, and only ever disappears through a rename into ``tmp/``, so readers see either a
whole artifact or none.

Crash hygiene: a ``tmp/build-<key>-*`` directory whose key lock can be taken has no live builder (a
killed process's flock is released by the kernel), so every lookup removes it at once; a crash loop
cannot fill the disk with half-built artifacts. A damaged artifact found by any lookup is discarded and
leaves a marker in ``corrupt/``; the next caller that reports events (``get_or_build``'s ``on_event``,
``lookup(on_event=...)``) turns each marker into one "corrupt" event, so a corruption found by
``shrinkserve profiles`` in another process is still counted by the server that rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import filelock

from shrinkserve.compression.durable import fsync_path

__all__ = ["MANIFEST_NAME", "Artifact", "ArtifactCache", "cache_key", "hash_path"]

logger = logging.getLogger("shrinkserve.cache")

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
CHUNK_SIZE = 4 * 1024 * 1024
# Build scratch of a dead builder goes at once (see clean_tmp); this age only applies to "discard-" dirs,
# whose owner cannot be checked.
STALE_TMP_SECONDS = 3600.0

# Keys become directory and lock-file names; refusing anything else rules out path traversal.
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# Fields derived from the files; letting update_manifest touch them would break verification.
_PROTECTED_FIELDS = frozenset({"key", "files", "bytes", "format"})
_BUILD_PREFIX = "build-"
_DISCARD_PREFIX = "discard-"
_MARKER_SUFFIX = ".json"

# Work directories of builds running in THIS process. flock is per open file, so another thread of this
# process cannot take a key lock we hold, but the thread that holds it can (filelock is re-entrant): a
# build function that looks up another artifact must not have its own scratch cleaned away.
_ACTIVE_BUILDS: set[str] = set()
_ACTIVE_BUILDS_LOCK = threading.Lock()


def _json_default(obj: Any) -> Any:
    # Recipes may arrive as MappingProxyType or other read-only mappings; json only knows dict.
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)


def _jsonable(obj: Any) -> Any:
    # Round-trip so the in-memory manifest equals what a later reader loads (tuples -> lists, ...).
    return json.loads(_canonical_json(obj))


def cache_key(inputs: Mapping[str, str], recipe: Mapping, tools: Mapping[str, str]) -> str:
    """sha256 hex of the canonical JSON of ``{inputs, recipe, tools}``."""
    payload = _canonical_json({"inputs": inputs, "recipe": recipe, "tools": tools})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _iter_files(root: Path) -> Iterator[tuple[str, Path]]:
    """Yield ``(posix relpath, path)`` of regular files under ``root``, sorted by relpath."""
    found: list[tuple[str, Path]] = []
    # os.walk does not follow directory symlinks, so a link cannot pull in a tree outside root.
    for dirpath, _dirnames, filenames in os.walk(root):
        for fname in filenames:
            p = Path(dirpath, fname)
            if p.is_file():
                found.append((p.relative_to(root).as_posix(), p))
    found.sort(key=lambda item: item[0])
    yield from found


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a directory (sorted relative paths + each file's sha256)."""
    path = Path(path)
    if path.is_file():
        return _hash_file(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    h = hashlib.sha256()
    for rel, p in _iter_files(path):
        # NUL/newline separators keep ("ab", "c...") and ("a", "bc...") from colliding.
        h.update(rel.encode("utf-8") + b"\0" + _hash_file(p).encode("ascii") + b"\n")
    return h.hexdigest()


def write_file_atomic(path: Path, write: Callable[[BinaryIO], object], *, tmp_prefix: str = ".tmp.") -> None:
    """`write(f)` into a temp file beside ``path``, fsync, rename over ``path``, fsync the directory: readers
    see the old file or the new one, never half of one (also what training checkpoints write through)."""
    fd, tmp_name = tempfile.mkstemp(prefix=tmp_prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_path(path.parent, directory=True)


def write_json_atomic(path: Path, data: Any, *, tmp_prefix: str = ".tmp.") -> None:
    """Replace ``path`` with ``data`` as JSON, atomically (`write_file_atomic`)."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_file_atomic(path, lambda f: f.write(text.encode("utf-8")), tmp_prefix=tmp_prefix)


def _safe_relpath(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel


@dataclass
class Artifact:
    """A verified (or, from ``list()``, merely listed) artifact directory."""

    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def bytes(self) -> int:
        """Total size of the artifact's files, per the manifest."""
        files = self.manifest.get("files") or {}
        return sum(int(meta["bytes"]) for meta in files.values())

    def file(self, name: str) -> Path:
        """Path of a listed file, or of a directory containing listed files (e.g. an HF checkpoint)."""
        name = PurePosixPath(name).as_posix()
        files = self.manifest.get("files") or {}
        prefix = name.rstrip("/") + "/"
        if not _safe_relpath(name) or (name not in files and not any(f.startswith(prefix) for f in files)):
            raise KeyError(f"{name!r} is not in artifact {self.key}")
        return self.path / name


class _Corrupt(Exception):
    """Internal: the artifact directory exists but fails verification."""


class ArtifactCache:
    """Content-addressed artifact cache rooted at ``root``."""

    def __init__(
        self, root: Path, *, lock_timeout: float | None = None, clean_stale_tmp: bool = True
    ) -> None:
        self.root = Path(root)
        self.artifacts_dir = self.root / "artifacts"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        self.corrupt_dir = self.root / "corrupt"
        self.lock_timeout = lock_timeout
        for d in (self.artifacts_dir, self.tmp_dir, self.locks_dir, self.corrupt_dir):
            d.mkdir(parents=True, exist_ok=True)
        # One FileLock per key per cache object: a second instance on the same file in the same
        # process would deadlock on flock instead of re-entering.
        self._locks: dict[str, filelock.FileLock] = {}
        self._locks_pid = os.getpid()
        self._locks_guard = threading.Lock()
        if clean_stale_tmp:
            self.clean_tmp()

    def work_dir(self, key: str) -> Path:
        """A stable per-key directory for state a build wants to find again after a crash (not created here).

        Only the holder of the key's lock (a running build) uses it; it goes once the artifact exists.
        """
        return self.root / "work" / self._check_key(key)

    def _drop_work_dir(self, key: str) -> None:
        work = self.root / "work" / key
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)

    # -- locking ---------------------------------------------------------------------------------

    def _lock(self, key: str) -> filelock.FileLock:
        with self._locks_guard:
            if self._locks_pid != os.getpid():
                # filelock refuses instances inherited across fork; a forked child starts afresh.
                self._locks, self._locks_pid = {}, os.getpid()
            lock = self._locks.get(key)
            if lock is None:
                lock = filelock.FileLock(self.locks_dir / f"{key}.lock")
                self._locks[key] = lock
            return lock

    def _acquire(self, key: str, timeout: float | None = None) -> filelock.AcquireReturnProxy:
        t = self.lock_timeout if timeout is None else timeout
        return self._lock(key).acquire(timeout=-1 if t is None else t)

    # -- paths -----------------------------------------------------------------------------------

    @staticmethod
    def _check_key(key: str) -> str:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(f"invalid cache key: {key!r}")
        return key

    def path_for(self, key: str) -> Path:
        """Final directory of ``key`` (which may not exist)."""
        return self.artifacts_dir / self._check_key(key)

    # -- verification ----------------------------------------------------------------------------

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any]:
        with open(path / MANIFEST_NAME, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict):
            raise ValueError("manifest is not a JSON object")
        return manifest

    def _verify(self, key: str, path: Path) -> dict[str, Any]:
        try:
            manifest = self._read_manifest(path)
        except FileNotFoundError as e:
            raise _Corrupt(f"{MANIFEST_NAME} is missing") from e
        except (OSError, ValueError) as e:
            raise _Corrupt(f"{MANIFEST_NAME} is unreadable ({e})") from e
        files = manifest.get("files")
        if manifest.get("key") != key or not isinstance(files, dict):
            raise _Corrupt(f"{MANIFEST_NAME} does not describe key {key}")
        for rel, meta in files.items():
            if not _safe_relpath(rel) or not isinstance(meta, dict):
                raise _Corrupt(f"{MANIFEST_NAME} has an invalid entry {rel!r}")
            fpath = path / rel
            try:
                size = fpath.stat().st_size
            except FileNotFoundError as e:
                raise _Corrupt(f"file {rel} is missing") from e
            # Size first: truncation (the usual crash/disk-full damage) is caught without hashing.
            if size != meta.get("bytes"):
                raise _Corrupt(f"file {rel} has {size} bytes, manifest says {meta.get('bytes')}")
            try:
                digest = _hash_file(fpath)
            except OSError as e:
                raise _Corrupt(f"file {rel} is unreadable ({e})") from e
            if digest != meta.get("sha256"):
                raise _Corrupt(f"file {rel} has sha256 {digest}, manifest says {meta.get('sha256')}")
        return manifest

    def _lookup(self, key: str) -> tuple[Artifact | None, bool]:
        """Return ``(artifact or None, corruption detected)``; removes dead builders' scratch first."""
        path = self.path_for(key)
        self.clean_tmp()
        try:
            st = path.stat()
        except FileNotFoundError:
            return None, False
        try:
            manifest = self._verify(key, path)
        except _Corrupt as e:
            return None, self._discard_corrupt(key, path, (st.st_dev, st.st_ino), str(e))
        return Artifact(key=key, path=path, manifest=manifest), False

    def _discard_corrupt(self, key: str, path: Path, ident: tuple[int, int], reason: str) -> bool:
        # Never wait here: a holder of the key lock is either building (and re-checks under the
        # lock itself) or removing, so leaving the damaged dir to it is safe and keeps lookup fast.
        try:
            self._acquire(key, timeout=0)
        except filelock.Timeout:
            logger.warning("artifact %s: %s; key is locked by another process, leaving it", key, reason)
            return True
        try:
            try:
                st = path.stat()
            except FileNotFoundError:
                st = None
            # If the directory was swapped while we hashed (someone else discarded and rebuilt
            # it), the damage we saw is gone; deleting now would destroy a good artifact.
            if st is None or (st.st_dev, st.st_ino) != ident:
                logger.debug("artifact %s changed during verification; not discarding", key)
                return False
            logger.warning("artifact %s: corrupt: %s; discarding %s", key, reason, path)
            self._discard_dir(key, path)
            self._mark_corrupt(key, reason)
            return True
        finally:
            self._lock(key).release()

    def _mark_corrupt(self, key: str, reason: str) -> None:
        # One file per discovery (never read-modify-write): takers claim markers by unlinking them, so
        # each discovery is reported exactly once whichever processes find and report it.
        marker = self.corrupt_dir / f"{key}.{uuid.uuid4().hex}{_MARKER_SUFFIX}"
        try:
            write_json_atomic(marker, {"key": key, "reason": reason, "pid": os.getpid(),
                                       "time": datetime.now(UTC).isoformat(timespec="seconds")})
        except OSError as exc:  # reporting must never turn a recoverable corruption into a failure
            logger.warning("artifact %s: could not record the corruption (%s)", key, exc)

    def _corrupt_markers(self, key: str) -> list[Path]:
        prefix = f"{key}."
        try:
            names = os.listdir(self.corrupt_dir)
        except FileNotFoundError:
            return []
        return [self.corrupt_dir / n for n in names if n.startswith(prefix) and n.endswith(_MARKER_SUFFIX)
                and not n.startswith(".")]

    def take_corrupt_events(self, key: str) -> int:
        """Claim the unreported corruptions of ``key`` (found by any process); return how many."""
        taken = 0
        for marker in self._corrupt_markers(key):
            try:
                marker.unlink()
            except FileNotFoundError:
                continue  # another reporter claimed it
            taken += 1
        return taken

    def _discard_dir(self, key: str, path: Path) -> None:
        # Rename first so that no reader ever sees a half-deleted artifact directory.
        trash = self.tmp_dir / f"{_DISCARD_PREFIX}{key}-{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    # -- public API ------------------------------------------------------------------------------

    def lookup(self, key: str, on_event: Callable[[str], None] | None = None) -> Artifact | None:
        """Return the artifact if every manifest-listed file verifies; discard it and return None if not.

        With ``on_event``, every unreported corruption of ``key`` (this lookup's or an earlier one's, from
        any process) is reported as "corrupt"; without it the markers wait for a reporting caller.
        """
        artifact = self._lookup(key)[0]
        if on_event is not None:
            for _ in range(self.take_corrupt_events(key)):
                on_event("corrupt")
        return artifact

    def lookup_state(self, key: str) -> tuple[Artifact | None, str]:
        """``(artifact, state)`` for status displays: "cached", "missing", or "corrupt" (damaged, discarded
        and not rebuilt yet). Reports nothing: the corruption stays pending for the process that rebuilds."""
        artifact, corrupt = self._lookup(key)
        if artifact is not None:
            return artifact, "cached"
        return None, "corrupt" if corrupt or self._corrupt_markers(key) else "missing"

    def get_or_build(
        self,
        key: str,
        *,
        name: str,
        recipe: Mapping,
        inputs: Mapping,
        tools: Mapping,
        build: Callable[[Path], Mapping | None],
        on_event: Callable[[str], None] | None = None,
    ) -> tuple[Artifact, bool]:
        """Return ``(artifact, cache_hit)``, building into a temp dir under the key's lock on a miss.

        ``on_event`` receives "hit", "miss" or "corrupt" (a damaged artifact was found and discarded, by
        this call or by an earlier lookup in any process that did not report it). Without ``on_event``
        the corruption stays pending for the next caller that reports.
        """

        def emit(event: str) -> None:
            if on_event is not None:
                on_event(event)

        def verified() -> Artifact | None:
            artifact, _corrupt = self._lookup(key)
            if on_event is not None:  # a caller that reports nothing leaves the markers to one that does
                for _ in range(self.take_corrupt_events(key)):
                    emit("corrupt")
            if artifact is not None:
                emit("hit")
            return artifact

        # Unlocked fast path: hits must not queue behind an unrelated long build of the same key.
        if (artifact := verified()) is not None:
            return artifact, True

        with self._acquire(key):
            # Re-check: another process may have finished the build while we waited for the lock.
            if (artifact := verified()) is not None:
                return artifact, True
            emit("miss")
            return self._build(key, name=name, recipe=recipe, inputs=inputs, tools=tools, build=build), False

    def _build(
        self,
        key: str,
        *,
        name: str,
        recipe: Mapping,
        inputs: Mapping,
        tools: Mapping,
        build: Callable[[Path], Mapping | None],
    ) -> Artifact:
        final = self.path_for(key)
        # The key in the name lets clean_tmp tell, via the key lock, whether a builder is still alive.
        work = Path(tempfile.mkdtemp(prefix=f"{_BUILD_PREFIX}{key}-", dir=self.tmp_dir))
        with _ACTIVE_BUILDS_LOCK:
            _ACTIVE_BUILDS.add(str(work))
        try:
            started = time.perf_counter()
            extra = build(work)
            build_seconds = time.perf_counter() - started
            if (work / MANIFEST_NAME).exists():
                raise ValueError(f"build function must not write {MANIFEST_NAME}")
            files: dict[str, dict[str, Any]] = {}
            for rel, p in _iter_files(work):
                files[rel] = {"bytes": p.stat().st_size, "sha256": _hash_file(p)}
                fsync_path(p)
            manifest = _jsonable(
                {
                    "key": key,
                    "name": name,
                    "recipe": recipe,
                    "inputs": inputs,
                    "tools": tools,
                    "files": files,
                    "bytes": sum(m["bytes"] for m in files.values()),
                    "built_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "build_seconds": build_seconds,
                    "extra": dict(extra) if extra is not None else {},
                    "format": MANIFEST_FORMAT,
                }
            )
            with open(work / MANIFEST_NAME, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            # New directory entries are only durable once their parent directories are synced.
            for dirpath, _dirs, _files in os.walk(work):
                fsync_path(Path(dirpath), directory=True)
            try:
                os.rename(work, final)
            except OSError as exc:
                # Only possible when the key lock did not exclude another builder (e.g. a shared volume
                # mounted without working locks): if what it left verifies, the work is done.
                winner = self._verify_existing(key, final, exc)
                shutil.rmtree(work, ignore_errors=True)
                return winner
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            with _ACTIVE_BUILDS_LOCK:
                _ACTIVE_BUILDS.discard(str(work))
        fsync_path(self.artifacts_dir, directory=True)
        self._drop_work_dir(key)  # the artifact is in place: what the build kept for a resume is done with
        logger.info("built artifact %s (%s): %d files, %d bytes", key, name, len(files), manifest["bytes"])
        return Artifact(key=key, path=final, manifest=manifest)

    def _verify_existing(self, key: str, final: Path, rename_error: OSError) -> Artifact:
        if not final.is_dir():
            raise rename_error
        try:
            manifest = self._verify(key, final)
        except _Corrupt as e:
            raise OSError(f"artifact {key}: another builder left {final} and it does not verify ({e}); "
                          "is file locking working on this volume?") from rename_error
        logger.warning("artifact %s was built concurrently by another process (file lock not effective?); "
                       "using its verified copy", key)
        return Artifact(key=key, path=final, manifest=manifest)

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The artifact's manifest as stored, without re-hashing its files (metadata reads), or None."""
        try:
            return self._read_manifest(self.path_for(key))
        except (OSError, ValueError):
            return None

    def update_manifest(
        self, key: str, updates: Mapping | Callable[[dict[str, Any]], Mapping],
    ) -> dict[str, Any]:
        """Merge top-level ``updates`` into the manifest atomically; "files" and derived fields are fixed.

        ``updates`` may be a function of the current manifest, called under the key's lock, so a
        read-modify-write of a nested field cannot lose a concurrent writer's change.
        """
        def checked(changes: Mapping) -> Mapping:
            bad = _PROTECTED_FIELDS.intersection(changes)
            if bad:
                raise ValueError(f"update_manifest may not change {sorted(bad)}")
            return changes

        if not callable(updates):
            checked(updates)
        path = self.path_for(key)
        with self._acquire(key):
            try:
                manifest = self._read_manifest(path)
            except FileNotFoundError as e:
                raise KeyError(f"no artifact {key}") from e
            changes = checked(updates(manifest)) if callable(updates) else updates
            manifest.update(_jsonable(dict(changes)))
            write_json_atomic(path / MANIFEST_NAME, manifest, tmp_prefix=f".{MANIFEST_NAME}.")
        return manifest

    def clean_tmp(self, max_age: float = STALE_TMP_SECONDS) -> int:
        """Remove scratch left by dead processes; return how many entries went.

        ``build-<key>-*``: removed as soon as the key lock can be taken (its builder is gone: the kernel
        drops a killed process's flock) and it is not a build of this process, whatever its age.
        ``discard-*``: directories renamed away for deletion, removed once older than ``max_age`` seconds:
        their owner cannot be checked (the chart's seed-cache init container copies into one while another
        pod sharing the volume may be looking up), and ours are deleted right after the rename anyway.
        Anything else is left alone.
        """
        removed = 0
        now = time.time()
        work_root = self.root / "work"
        if work_root.is_dir():  # a build killed between its artifact's rename and the work dir's removal
            for work in list(work_root.iterdir()):
                if (self.artifacts_dir / work.name).is_dir():
                    shutil.rmtree(work, ignore_errors=True)
        try:
            entries = list(self.tmp_dir.iterdir())
        except FileNotFoundError:
            return 0
        for entry in entries:
            name = entry.name
            if name.startswith(_BUILD_PREFIX):
                key = name[len(_BUILD_PREFIX) :].rsplit("-", 1)[0]
                if not _KEY_RE.fullmatch(key) or not self._remove_dead_build(key, entry):
                    continue
            elif name.startswith(_DISCARD_PREFIX):
                try:
                    if now - entry.stat().st_mtime < max_age:
                        continue
                except FileNotFoundError:
                    continue
                shutil.rmtree(entry, ignore_errors=True)
            else:
                continue
            removed += 1
            logger.info("removed stale temp dir %s", entry)
        return removed

    def _remove_dead_build(self, key: str, entry: Path) -> bool:
        with _ACTIVE_BUILDS_LOCK:
            if str(entry) in _ACTIVE_BUILDS:
                return False
        lock = self._lock(key)
        if lock.is_locked:  # this thread holds the key (a lookup from inside a build or update)
            return False
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            return False  # a live builder (another process or thread) owns it
        try:
            with _ACTIVE_BUILDS_LOCK:  # re-check: a build of ours may have started before we locked
                if str(entry) in _ACTIVE_BUILDS:
                    return False
            if not entry.exists():
                return False
            shutil.rmtree(entry, ignore_errors=True)
            return True
        finally:
            lock.release()

    def remove(self, key: str) -> bool:
        """Delete an artifact; return whether it existed."""
        path = self.path_for(key)
        with self._acquire(key):
            if not path.exists():
                return False
            self._discard_dir(key, path)
            return True

    # Defined last: inside the class body, later annotations would otherwise see this method as `list`.
    def list(self) -> list[Artifact]:
        """All artifacts whose manifest is readable (files are not verified), sorted by key."""
        self.clean_tmp()
        out: list[Artifact] = []
        for entry in sorted(self.artifacts_dir.iterdir()):
            if not entry.is_dir() or not _KEY_RE.fullmatch(entry.name):
                continue
            try:
                manifest = self._read_manifest(entry)
            except (OSError, ValueError):
                continue
            out.append(Artifact(key=entry.name, path=entry, manifest=manifest))
        return out
