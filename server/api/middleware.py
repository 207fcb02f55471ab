"""ASGI middleware (plain ASGI: nothing wraps the body, so streamed tokens pay nothing per chunk)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from shrinkserve.server.api.errors import APIError
from shrinkserve.server.lifecycle import Lifecycle

ALWAYS_OPEN = frozenset({"/health", "/ready", "/metrics"})


class DrainGate:
    """While the server drains, every new API request gets 503 with Retry-After; health, ready and
    metrics still answer, so the orchestrator and Prometheus see the drain."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, retry_after: int = 5) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.lifecycle.draining and scope["path"] not in ALWAYS_OPEN:
            response = APIError(503, "the server is shutting down; retry on another replica",
                                code="server_shutting_down", headers={"Retry-After": str(self.retry_after)}).response()
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
