"""create_app: the process-wide services, the routers and middleware, and the lifespan → Lifecycle."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from starlette.types import Scope

from shrinkserve.server.api import admin, models, openai, tokenizer
from shrinkserve.server.api.errors import install_handlers
from shrinkserve.server.api.middleware import ApiGate, Authenticator
from shrinkserve.server.api.openapi import install_openapi
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

    app = FastAPI(title="shrinkserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for compressed language models")
    app.state.services = svc
    install_handlers(app)
    auth = Authenticator(settings.api_keys)
    app.add_middleware(ApiGate, lifecycle=lifecycle, auth=auth, max_body_bytes=settings.max_request_body_bytes,
                       requests=metrics.requests, profile_label=profile_label(svc))
    for module in (openai, models, tokenizer):
        module.attach_router(app, svc)
    admin.attach_router(app, svc)
    install_openapi(app, auth=auth.enabled, models=list(settings.profiles))
    return app


def profile_label(svc: Services) -> Callable[[Scope], str]:
    """The `profile` label of a request's count: the profile it named (or its route's), when that exists."""
    prefixes = sorted(svc.settings.routes.items(), key=lambda kv: -len(kv[0]))

    def label(scope: Scope) -> str:
        name = scope.get("state", {}).get("profile")
        if name is None:
            path = scope["path"]
            name = next((p for prefix, p in prefixes if path.startswith(prefix + "/")), None)
        return name if name in svc.registry.profiles else "none"

    return label
