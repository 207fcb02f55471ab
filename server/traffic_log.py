"""Captured traffic: each finished generation as one JSONL record, with the serving profile's top-k logprobs.

Why: a student can later be distilled on the teacher's output distributions (logit matching) from real
traffic without replaying calls, and AWQ/GPTQ can calibrate on what users actually send
(`calibration.file: <capture>.jsonl`). Off unless `SHRINKSERVE_CAPTURE__FILE` (or `capture.file`) is set.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class CaptureSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: Path | None = Field(default=None, description="JSONL file appended to; unset = no capture")
    top_k: int = Field(default=20, ge=0, le=100, description="teacher logprobs kept per generated token")
    profiles: list[str] = Field(default_factory=list, description="profiles to capture; empty = all")


class TrafficLog:
    """Appends records from worker threads; a line is written whole (one write under a lock)."""

    def __init__(self, settings: CaptureSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        if settings.file is not None:
            settings.file.expanduser().parent.mkdir(parents=True, exist_ok=True)

    def wants(self, profile: str) -> bool:
        s = self.settings
        return s.file is not None and (not s.profiles or profile in s.profiles)

    def record(
        self, *, profile: str, prompt_ids: list[int], prompt_text: str, completion_ids: list[int],
        completion_text: str, finish_reason: str | None, teacher: Iterable[list[tuple[int, float]]],
    ) -> None:
        assert self.settings.file is not None
        line = json.dumps({
            "time": time.time(), "profile": profile, "finish_reason": finish_reason,
            "prompt_ids": prompt_ids, "completion_ids": completion_ids,
            "text": prompt_text + completion_text, "prompt_chars": len(prompt_text),
            # per generated token: [[token id, logprob], ...] of the top-k next-token distribution
            "teacher_topk": [[[i, round(lp, 5)] for i, lp in top] for top in teacher],
        }, ensure_ascii=False)
        with self._lock, open(self.settings.file.expanduser(), "a", encoding="utf-8") as f:
            f.write(line + "\n")
