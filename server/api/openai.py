"""POST /v1/completions, /v1/chat/completions and /v1/responses: map HTTP to the serving flow and back.

Preparing a request (template, tokenization, grammar compilation) runs in a worker thread; admission
happens before any response byte; a client that leaves cancels its generation (499, no traceback).
Counting by status happens in api/middleware.py.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse

from shrinkserve.server.api import protocol as P
from shrinkserve.server.api.deps import label, ready_profile, run_cpu, unless_disconnected
from shrinkserve.server.api.services import Services
from shrinkserve.server.serving import base, chat, completions, responses
from shrinkserve.server.serving.sse import sse_events

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _capture(svc: Services, profile: str, http: Request) -> dict[str, Any]:
    """Whether (and with how many logprobs per token) this request is captured, and the route it came on."""
    route = http.url.path
    return {"capture_top_k": svc.registry.capture.top_k(profile, route), "route": route}


def _stream(events: Any) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def router(svc: Services, forced: str | None) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/completions", response_model=None, responses={200: {"model": P.CompletionResponse}})
    async def create_completion(req: P.CompletionRequest, http: Request) -> Any:
        t_arrival = time.perf_counter()
        label(http, forced, req.model)
        rt = await ready_profile(svc.registry, forced, req.model)
        prepared = await unless_disconnected(http, run_cpu(completions.prepare, rt, req, t_arrival))
        job = await unless_disconnected(http, base.start(prepared, svc.metrics, **_capture(svc, rt.name, http)))
        if req.stream:
            return _stream(sse_events(completions.chunks(req, job)))
        return completions.response(req, job, await unless_disconnected(http, job.collect()))

    @r.post("/v1/chat/completions", response_model=None, responses={200: {"model": P.ChatCompletionResponse}})
    async def create_chat_completion(req: P.ChatCompletionRequest, http: Request) -> Any:
        t_arrival = time.perf_counter()
        label(http, forced, req.model)
        rt = await ready_profile(svc.registry, forced, req.model)
        prepared, plan = await unless_disconnected(http, run_cpu(chat.prepare, rt, req, t_arrival))
        job = await unless_disconnected(http, base.start(prepared, svc.metrics, **_capture(svc, rt.name, http)))
        if req.stream:
            return _stream(sse_events(chat.chunks(req, plan, job)))
        return chat.response(req, plan, job, await unless_disconnected(http, job.collect()))

    @r.post("/v1/responses", response_model=None, responses={200: {"model": P.ResponseObject}})
    async def create_response(req: P.ResponsesRequest, http: Request) -> Any:
        t_arrival = time.perf_counter()
        label(http, forced, req.model)
        rt = await ready_profile(svc.registry, forced, req.model)
        chat_req = responses.to_chat(req)
        prepared, plan = await unless_disconnected(http, run_cpu(chat.prepare, rt, chat_req, t_arrival))
        job = await unless_disconnected(http, base.start(prepared, svc.metrics, **_capture(svc, rt.name, http)))
        if req.stream:
            return _stream(responses.events(req, plan, job))
        return responses.response(req, plan, job, await unless_disconnected(http, job.collect()))

    return r


def attach_router(app: FastAPI, svc: Services) -> None:
    app.include_router(router(svc, None))
    for prefix, profile in svc.settings.routes.items():
        app.include_router(router(svc, profile), prefix=prefix)
