"""Traffic capture as a core observer: each finished generation goes to the capture writer off the scheduler thread.

The core hands a `FinishedGeneration` to its observers from its scheduler thread; writing a file there
would stall every sequence of the batch, so `CaptureObserver` only queues the record and one writer
thread appends it. The writer is today's JSONL `TrafficLog` (server/traffic_log.py); the adapter is the
only place that knows its format.
"""

from __future__ import annotations

import logging
import queue
import threading

from shrinkserve.server.engines.base import Tokenizer
from shrinkserve.server.runtime.types import FinishedGeneration
from shrinkserve.server.traffic_log import TrafficLog

log = logging.getLogger("shrinkserve.capture")


class CaptureQueue:
    """Finished generations queued to one thread that appends them to the traffic log, in the order they finished."""

    def __init__(self, traffic: TrafficLog) -> None:
        self.traffic = traffic
        self._queue: queue.SimpleQueue[tuple[FinishedGeneration, Tokenizer] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def observer(self, profile: str, tokenizer: Tokenizer) -> CaptureObserver | None:
        return CaptureObserver(self, tokenizer) if self.traffic.wants(profile) else None

    def put(self, fin: FinishedGeneration, tokenizer: Tokenizer) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
            self._thread.start()
        self._queue.put((fin, tokenizer))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fin, tok = item
            try:
                write(self.traffic, fin, tok)
            except Exception:  # a full disk must not take serving down
                log.exception("capturing a generation of %s failed", fin.profile)

    def close(self) -> None:
        """Write what is queued, then stop."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class CaptureObserver:
    def __init__(self, writer: CaptureQueue, tokenizer: Tokenizer) -> None:
        self.writer = writer
        self.tokenizer = tokenizer

    def __call__(self, fin: FinishedGeneration) -> None:
        self.writer.put(fin, self.tokenizer)


def write(traffic: TrafficLog, fin: FinishedGeneration, tok: Tokenizer) -> None:
    """The JSONL record of server/traffic_log.py: completion without the final EOS, as the API reported it."""
    ids, topk = fin.completion_ids, fin.topk
    if fin.finish_reason == "stop" and ids and ids[-1] in tok.eos_token_ids and not fin.params.ignore_eos:
        ids, topk = ids[:-1], topk[:-1]
    traffic.record(profile=fin.profile, prompt_ids=list(fin.prompt_ids), prompt_text=tok.detokenize(fin.prompt_ids),
                   completion_ids=list(ids), completion_text=tok.detokenize(ids), finish_reason=fin.finish_reason,
                   teacher=topk)
