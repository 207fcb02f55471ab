"""POST /v1/completions, /v1/chat/completions and /v1/responses: map HTTP to the serving flow and back.

Preparing a request (template, tokenization, grammar compilation) runs in a worker thread; admission
happens before any response byte; a client that leaves cancels its generation (499, no traceback).
Each admitted run is closed by its handler (`async with job`) or, streamed, by its response (`RunStream`),
so its ticket comes back on every path. Counting by status happens in api/middleware.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from shrinkserve.server.api.deps import label, ready_profile, run_cpu, unless_disconnected
from shrinkserve.server.api.services import Services
from shrinkserve.server.protocol import openai as P
from shrinkserve.server.serving import base, chat, completions, responses
from shrinkserve.server.serving.sse import sse_events

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _capture(svc: Services, profile: str, http: Request) -> dict[str, Any]:
    """Whether (and with how many logprobs per token) this request is captured, and the route it came on."""
    route = http.url.path
    return {"capture_top_k": svc.registry.capture.top_k(profile, route), "route": route}


class RunStream(StreamingResponse):
    """An SSE response that owns its run. Starlette neither closes a body iterator it stopped reading (the
    client left) nor one it never started (the client left before the headers), so whatever way the response
    ends, the body is closed here and then the run: the generation is aborted and the ticket comes back."""

    def __init__(self, events: AsyncGenerator[str, None], run: base.Run) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.events = events
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.events.aclose()
            finally:
                await self.run.aclose()


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
            return RunStream(sse_events(completions.chunks(req, job)), job)
        async with job:
            return completions.response(req, job, await unless_disconnected(http, job.collect()))

    @r.post("/v1/chat/completions", response_model=None, responses={200: {"model": P.ChatCompletionResponse}})
    async def create_chat_completion(req: P.ChatCompletionRequest, http: Request) -> Any:
        t_arrival = time.perf_counter()
        label(http, forced, req.model)
        rt = await ready_profile(svc.registry, forced, req.model)
        prepared, plan = await unless_disconnected(http, run_cpu(chat.prepare, rt, req, t_arrival))
        job = await unless_disconnected(http, base.start(prepared, svc.metrics, **_capture(svc, rt.name, http)))
        if req.stream:
            return RunStream(sse_events(chat.chunks(req, plan, job)), job)
        async with job:
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
            return RunStream(responses.events(req, plan, job), job)
        async with job:
            return responses.response(req, plan, job, await unless_disconnected(http, job.collect()))

    return r


def attach_router(app: FastAPI, svc: Services) -> None:
    app.include_router(router(svc, None))
    for prefix, profile in svc.settings.routes.items():
        app.include_router(router(svc, profile), prefix=prefix)
