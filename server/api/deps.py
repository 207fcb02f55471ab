"""Request-scoped helpers of the HTTP layer: auth, profile resolution, waiting while the client is there."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request

from shrinkserve.server.api.errors import APIError
from shrinkserve.server.runtime.registry import NotServed, ProfileRuntime, Registry, UnknownProfile
from shrinkserve.server.settings import Settings

T = TypeVar("T")


def auth(settings: Settings) -> Callable[[Request], None]:
    keys = [k.encode() for k in settings.api_keys]

    def check(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip().encode()
        # Constant-time comparison against every key: the time taken says nothing about a key's prefix.
        if not any([hmac.compare_digest(token, k) for k in keys]):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")

    return check


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


async def unless_disconnected(request: Request, work: Awaitable[T], poll: float = 0.5) -> T:
    """Await `work`; if the client hangs up meanwhile, cancel it (which aborts its generation)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=poll)
            if not task.done() and await request.is_disconnected():
                task.cancel()
        return task.result()
    finally:
        if not task.done():
            task.cancel()
