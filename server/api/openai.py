"""POST /v1/completions and /v1/chat/completions: map HTTP to the serving flow and back, nothing else."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from shrinkserve.server.api import protocol as P
from shrinkserve.server.api.deps import auth, ready_profile, unless_disconnected
from shrinkserve.server.api.errors import APIError
from shrinkserve.server.api.services import Services
from shrinkserve.server.serving import base, chat, completions
from shrinkserve.server.serving.sse import sse_events

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def counted(svc: Services, profile_hint: str | None, call: Callable[[], Awaitable[Any]]) -> Any:
    """Count the request by profile and status code, whatever happens (a stream counts when it starts)."""
    label = profile_hint if profile_hint in svc.registry.profiles else "none"
    try:
        result = await call()
    except APIError as exc:
        svc.metrics.requests.labels(label, str(exc.status)).inc()
        raise
    except Exception:
        svc.metrics.requests.labels(label, "500").inc()
        raise
    svc.metrics.requests.labels(label, "200").inc()
    return result


def _capture(svc: Services, profile: str, http: Request) -> dict[str, Any]:
    """Whether (and with how many logprobs per token) this request is captured, and the route it came on."""
    route = http.url.path
    return {"capture_top_k": svc.registry.capture.top_k(profile, route), "route": route}


def router(svc: Services, forced: str | None) -> APIRouter:
    r = APIRouter(dependencies=[Depends(auth(svc.settings))])

    @r.post("/v1/completions", response_model=None)
    async def create_completion(req: P.CompletionRequest, http: Request) -> Any:
        async def run() -> Any:
            t_arrival = time.perf_counter()
            rt = await ready_profile(svc.registry, forced, req.model)
            prepared = completions.prepare(rt, req, t_arrival)
            job = await unless_disconnected(http, base.start(prepared, svc.metrics, **_capture(svc, rt.name, http)))
            if req.stream:
                return StreamingResponse(sse_events(completions.chunks(req, job)), media_type="text/event-stream",
                                         headers=SSE_HEADERS)
            return completions.response(req, job, await unless_disconnected(http, job.collect()))

        return await counted(svc, forced or req.model, run)

    @r.post("/v1/chat/completions", response_model=None)
    async def create_chat_completion(req: P.ChatCompletionRequest, http: Request) -> Any:
        async def run() -> Any:
            t_arrival = time.perf_counter()
            rt = await ready_profile(svc.registry, forced, req.model)
            prepared = chat.prepare(rt, req, t_arrival)
            job = await unless_disconnected(http, base.start(prepared, svc.metrics, **_capture(svc, rt.name, http)))
            if req.stream:
                return StreamingResponse(sse_events(chat.chunks(req, job)), media_type="text/event-stream",
                                         headers=SSE_HEADERS)
            return chat.response(req, job, await unless_disconnected(http, job.collect()))

        return await counted(svc, forced or req.model, run)

    return r


def attach_router(app: FastAPI, svc: Services) -> None:
    app.include_router(router(svc, None))
    for prefix, profile in svc.settings.routes.items():
        app.include_router(router(svc, profile), prefix=prefix)
