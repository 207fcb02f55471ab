"""create_app: the process-wide services, the routers and middleware, and the lifespan → Lifecycle."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from shrinkserve.server.api import admin, models, openai, tokenizer
from shrinkserve.server.api.errors import install_handlers
from shrinkserve.server.api.middleware import DrainGate
from shrinkserve.server.api.services import Services
from shrinkserve.server.lifecycle import Lifecycle
from shrinkserve.server.runtime.metrics import Metrics
from shrinkserve.server.runtime.registry import Registry
from shrinkserve.server.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    registry = Registry(settings, metrics)
    lifecycle = Lifecycle(registry, settings.drain_timeout_seconds)
    svc = Services(settings, registry, metrics, lifecycle, started=int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        lifecycle.start()
        try:
            yield
        finally:
            await lifecycle.drain()  # a no-op when SIGTERM already drained
            lifecycle.stop()

    app = FastAPI(title="shrinkserve", version="0.1.0", lifespan=lifespan)
    app.state.services = svc
    install_handlers(app)
    app.add_middleware(DrainGate, lifecycle=lifecycle)
    for module in (openai, models, tokenizer):
        module.attach_router(app, svc)
    admin.attach_router(app, svc)
    return app
