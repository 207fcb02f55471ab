"""Request-scoped helpers of the HTTP layer: profile resolution, CPU work off the loop, waiting while the
client is there. (Authentication happens before routing, in api/middleware.py.)"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from fastapi import Request

from shrinkserve.server.protocol.errors import APIError, ClientGone
from shrinkserve.server.runtime.registry import NotServed, ProfileRuntime, Registry, UnknownProfile

P = ParamSpec("P")

T = TypeVar("T")


def unknown_model(name: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist; see GET /v1/models", param="model",
                    code="model_not_found")


def profile_runtime(registry: Registry, name: str) -> ProfileRuntime:
    try:
        return registry.get(name)
    except UnknownProfile:
        raise unknown_model(name) from None


async def ready_profile(registry: Registry, forced: str | None, model: str | None) -> ProfileRuntime:
    """The route's profile if the URL names one, else the request's `model`; loaded (lazy ones wait) and ready."""
    rt = profile_runtime(registry, forced or model or "")
    try:
        await registry.ensure_ready(rt)
    except NotServed as exc:
        headers = {"Retry-After": "5"} if exc.code == "profile_not_ready" else None
        raise APIError(503, str(exc), code=exc.code, headers=headers) from exc
    return rt


def label(request: Request, forced: str | None, model: str | None) -> None:
    """Which profile the request is for, as the request counter labels it (api/middleware.py)."""
    request.state.profile = forced or model


async def unless_disconnected(request: Request, work: Awaitable[T], poll: float = 0.5) -> T:
    """Await `work`; if the client hangs up meanwhile, cancel it (which aborts its generation) and raise
    ClientGone (a 499 nobody reads: counted, never logged as an error)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=poll)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.wait({task})  # let the generation's cleanup run before answering
                raise ClientGone()
        return task.result()
    finally:
        if not task.done():
            task.cancel()


# Prompt rendering, tokenization and grammar compilation run here, not on the event loop, so /health
# and every running stream keep their pace whatever a request costs to prepare. llama.cpp's tokenizer
# and llguidance release the GIL; a few threads are enough on a CPU box.
_CPU = ThreadPoolExecutor(max_workers=4, thread_name_prefix="api-cpu")


async def run_cpu(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await asyncio.get_running_loop().run_in_executor(_CPU, functools.partial(fn, *args, **kwargs))
