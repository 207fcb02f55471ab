"""Traffic capture as a core observer: each finished generation becomes a capture record (compression/traffic/),
written off the scheduler thread.

The core hands a `FinishedGeneration` to its observers from its scheduler thread; writing a file there
would stall every sequence of the batch, so `CaptureObserver` only queues it and one writer thread turns it
into a `CaptureRecord` (with the profile's teacher identity, computed once when the profile loads) and
appends it to the `CaptureWriter`'s current segment.

Who is captured is the writer's rule (`CaptureWriter.wants`): profiles listed in `capture.profiles`, else
those marked `is_teacher: true`; a profile's `capture: false` and `capture.exclude_routes` opt out. The
route a request came on travels with it (GenerationRequest.route → FinishedGeneration.route).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from typing import Any

from shrinkserve.compression.traffic.record import TeacherIdentity, record_from_finished, served_teacher
from shrinkserve.compression.traffic.writer import CaptureSettings, CaptureWriter
from shrinkserve.server.engines.base import Tokenizer
from shrinkserve.server.runtime.types import FinishedGeneration

log = logging.getLogger("shrinkserve.capture")


class CaptureQueue:
    """Finished generations queued to one thread that writes them as capture records, in the order they finished."""

    def __init__(self, settings: CaptureSettings, profiles: Mapping[str, Any]) -> None:
        self.settings = settings
        self.writer = CaptureWriter(settings, profiles)
        self._queue: queue.SimpleQueue[tuple[FinishedGeneration, TeacherIdentity] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def top_k(self, profile: str, route: str | None) -> int:
        """How many teacher logprobs a request of `profile` on `route` keeps per token (0: not captured)."""
        return self.settings.top_k if self.writer.wants(profile, route) else 0

    def observer(self, profile: str, tokenizer: Tokenizer, built: Any) -> CaptureObserver | None:
        """The profile's observer, or None when it is never captured. `built` is its BuiltProfile: the artifact
        key (or the content hash of a source served as is) names the teacher in every record."""
        if not self.writer.wants(profile):
            return None
        teacher = served_teacher(profile, built, token_bytes=tokenizer.token_bytes, vocab_size=tokenizer.vocab_size,
                                 eos_token_ids=tokenizer.eos_token_ids, chat_template=tokenizer.chat_template)
        return CaptureObserver(self, teacher)

    def put(self, fin: FinishedGeneration, teacher: TeacherIdentity) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
                self._thread.start()
        self._queue.put((fin, teacher))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fin, teacher = item
            try:
                self.writer.record(record_from_finished(fin, teacher, route=fin.route))
            except Exception:  # a malformed generation must not stop the writer (the writer never raises on I/O)
                log.exception("capturing a generation of %s failed", fin.profile)

    def close(self) -> None:
        """Write what is queued, then close the current segment (after the cores stopped producing)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()
        self.writer.close()


class CaptureObserver:
    def __init__(self, capture: CaptureQueue, teacher: TeacherIdentity) -> None:
        self.capture = capture
        self.teacher = teacher

    def __call__(self, fin: FinishedGeneration) -> None:
        # Cores call observers only for requests admitted with capture_top_k > 0: the profile and route
        # rule (`CaptureQueue.top_k`) was applied once, at admission.
        if fin.completion_ids:
            self.capture.put(fin, self.teacher)
