"""Training checkpoints that survive kill -9 at any instant.

Same discipline as compression/cache.py: a checkpoint is written into a temp directory, every file and the
directory are fsynced, and only then is it renamed to `step-<n>`; so a `step-*` directory is always whole,
and a crash leaves at most a `.tmp-*` directory that the next run removes. The newest loadable checkpoint
wins; one that fails to load (e.g. a disk error) is skipped in favour of the one before, which is why more
than one is kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shrinkserve.compression.cache import write_file_atomic as _write_file_atomic
from shrinkserve.compression.durable import fsync_path

_STEP_RE = re.compile(r"step-(\d{8,})")
_TMP_PREFIX = ".tmp-"
STATE = "state.json"
MODEL = "model.pt"
OPTIMIZER = "optimizer.pt"


def write_file_atomic(path: Path, write: Any) -> None:
    """`write(f)` into a temp file beside `path` (a name the store's sweep removes), fsync, rename over `path`,
    fsync the directory."""
    _write_file_atomic(path, write, tmp_prefix=_TMP_PREFIX)


@dataclass
class Checkpoint:
    step: int
    path: Path
    state: dict[str, Any]

    def model_state(self, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return torch.load(self.path / MODEL, map_location=map_location, weights_only=True)

    def optimizer_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return torch.load(self.path / OPTIMIZER, map_location=map_location, weights_only=True)


class CheckpointStore:
    """`step-<n>/{model.pt, optimizer.pt, state.json}` under one run directory."""

    def __init__(self, root: Path, *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep at least one checkpoint")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        for entry in self.root.iterdir():  # leftovers of a run killed mid-write
            if entry.name.startswith(_TMP_PREFIX):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def steps(self) -> list[int]:
        out = []
        for entry in self.root.iterdir():
            m = _STEP_RE.fullmatch(entry.name)
            if m and entry.is_dir():
                out.append(int(m.group(1)))
        return sorted(out)

    def save(
        self, step: int, model_state: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any],
        state: Mapping[str, Any],
    ) -> Path:
        final = self.root / f"step-{step:08d}"
        work = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
        try:
            torch.save(dict(model_state), work / MODEL)
            torch.save(dict(optimizer_state), work / OPTIMIZER)
            (work / STATE).write_text(json.dumps({**state, "step": step}, sort_keys=True), encoding="utf-8")
            for name in (MODEL, OPTIMIZER, STATE):
                fsync_path(work / name)
            fsync_path(work, directory=True)
            if final.exists():  # the same step saved again after a resume: replace it whole
                self._remove(final)
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        fsync_path(self.root, directory=True)
        for old in self.steps()[: -self.keep]:
            self._remove(self.root / f"step-{old:08d}")
        return final

    def _remove(self, path: Path) -> None:
        # Rename out of the step-* namespace first, so nobody ever loads a half-deleted checkpoint.
        trash = self.root / f"{_TMP_PREFIX}del-{uuid.uuid4().hex}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint whose state reads and whose files are present."""
        for step in reversed(self.steps()):
            path = self.root / f"step-{step:08d}"
            try:
                state = json.loads((path / STATE).read_text(encoding="utf-8"))
                if not ((path / MODEL).is_file() and (path / OPTIMIZER).is_file()):
                    continue
            except (OSError, ValueError):
                continue
            return Checkpoint(step, path, state)
        return None
