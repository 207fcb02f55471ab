"""The server's life cycle: starting → serving → draining → stopped, and graceful drain on SIGTERM.

On SIGTERM (or the first Ctrl-C): `/ready` answers 503 at once and new requests get 503 with
Retry-After (api/middleware.py); running generations get `drain_timeout_seconds` to finish, then end
with finish_reason "abort" and `data: [DONE]`; only then does uvicorn stop accepting connections and
run the app's shutdown, where every core joins its scheduler thread before its engine is freed. The
process then exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType
from typing import Literal

import uvicorn

from shrinkserve.server.runtime.registry import Registry

log = logging.getLogger("shrinkserve.lifecycle")

Phase = Literal["starting", "serving", "draining", "stopped"]


class Lifecycle:
    def __init__(self, registry: Registry, drain_timeout: float) -> None:
        self.registry = registry
        self.drain_timeout = drain_timeout
        self.phase: Phase = "starting"
        self._drained: asyncio.Event | None = None

    @property
    def draining(self) -> bool:
        return self.phase in ("draining", "stopped")

    def start(self) -> None:
        """From the app's startup: begin loading profiles and accept requests."""
        self._drained = asyncio.Event()
        self.registry.start()
        self.phase = "serving"

    async def drain(self) -> None:
        """Stop admitting; give running generations until the deadline; abort what is left."""
        if self.phase == "draining" or self.phase == "stopped":
            assert self._drained is not None
            await self._drained.wait()
            return
        self.phase = "draining"
        deadline = time.monotonic() + self.drain_timeout
        log.info("draining: up to %.0f s for running generations", self.drain_timeout)
        try:
            await self.registry.drain(deadline)
        finally:
            assert self._drained is not None
            self._drained.set()

    def stop(self) -> None:
        """From the app's shutdown: evaluations stop, cores join their threads, engines are freed."""
        self.phase = "stopped"
        self.registry.close()


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM drains the app before uvicorn stops serving (and the exit code stays 0)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self._signalled = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled:  # a second signal: stop now (uvicorn's own handling; SIGINT forces)
            self.force_exit = self.force_exit or sig == signal.SIGINT
            self.should_exit = True
            return
        self._signalled = True
        # Runs in the main thread between bytecodes: hand the drain to the event loop.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.should_exit = True
            return
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        try:
            await self.lifecycle.drain()
        except Exception:
            log.exception("drain failed")
        self.should_exit = True
