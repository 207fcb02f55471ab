"""The one ASGI middleware in front of the API (plain ASGI: streamed tokens pay nothing per chunk).

For every API request, in this order, before any route code or body parsing runs:
1. while the server drains: 503 with Retry-After (health, ready and metrics still answer, so the
   orchestrator and Prometheus see the drain);
2. authentication, when `api_keys` is set: only `Authorization: Bearer <key>` (scheme case-insensitive),
   compared in constant time, before a byte of the body is read;
3. the body-size limit: a declared `Content-Length` over the limit is a 413 at once, a chunked body is
   counted while it is read and cut off with 413 as soon as it passes the limit (uvicorn discards the
   rest without buffering it), so an oversized upload never reaches memory or the JSON parser;
4. counting: `shrinkserve_requests_total{profile, status}` by the FINAL status of every request, 499 for a
   client that left before its answer was complete (a stream cut mid-way too); a client that left is not
   an error, so no traceback is logged for it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import Counter
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shrinkserve.server.api.errors import error_response
from shrinkserve.server.lifecycle import Lifecycle
from shrinkserve.server.protocol.errors import APIError

log = logging.getLogger("shrinkserve.api")

ALWAYS_OPEN = frozenset({"/health", "/ready", "/metrics"})
DOCS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _digest(token: bytes) -> bytes:
    # Compare fixed-length digests: hmac.compare_digest on raw keys would still leak their lengths.
    return hashlib.sha256(token).digest()


class Authenticator:
    """Bearer-token check against the configured keys, constant-time and independent of which key matches."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.digests = [_digest(k.encode("utf-8")) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def accepts(self, authorization: bytes | None) -> bool:
        if not self.digests:
            return True
        scheme, _, token = (authorization or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        given = _digest(token.strip())
        ok = False
        for d in self.digests:  # every key is compared, whatever matched before
            ok |= hmac.compare_digest(given, d)
        return ok


class ApiGate:
    """Drain gate, authentication, body-size limit and request counting for every API request."""

    def __init__(self, app: ASGIApp, *, lifecycle: Lifecycle, auth: Authenticator, max_body_bytes: int,
                 requests: Counter, profile_label: Callable[[Scope], str], retry_after: int = 5) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.requests = requests
        self.profile_label = profile_label
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ALWAYS_OPEN or scope["path"] in DOCS:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})
        seen: dict[str, object] = {"status": None, "complete": False, "gone": False}

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                seen["gone"] = True
            return message

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                seen["complete"] = True
            await send(message)

        try:
            await self._gated(scope, watched_receive, watched_send)
        except ClientDisconnect:
            seen["gone"] = True  # the client left while its body was read or its stream was written
        except Exception:
            if not seen["gone"]:
                self._count(scope, 500)
                raise
            log.info("%s %s: the client left; the request ended with %s", scope["method"], scope["path"],
                     "an error", exc_info=log.isEnabledFor(logging.DEBUG))
        except BaseException:  # cancelled (shutdown): counted as abandoned, then propagated
            self._count(scope, 499)
            raise
        if seen["complete"] and seen["status"] != 499:
            self._count(scope, int(seen["status"]))  # type: ignore[call-overload]
        elif seen["gone"] or seen["status"] is not None:
            self._count(scope, 499)
        else:
            self._count(scope, 500)  # returned without a response: uvicorn answers 500

    def _count(self, scope: Scope, status: int) -> None:
        self.requests.labels(self.profile_label(scope), str(status)).inc()

    async def _gated(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.lifecycle.draining:
            await self._reject(scope, receive, send, APIError(
                503, "the server is shutting down; retry on another replica", code="server_shutting_down",
                headers={"Retry-After": str(self.retry_after)}))
            return
        headers = _headers(scope)
        if not self.auth.accepts(headers.get(b"authorization")):
            await self._reject(scope, receive, send, APIError(
                401, "invalid or missing API key (send the header 'Authorization: Bearer <key>')",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
            return
        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(scope, receive, send, self._too_large(int(declared)))
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._reject(scope, receive, send, self._too_large(None))
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then the real channel: disconnects still reach the app

        await self.app(scope, replay, send)

    def _too_large(self, declared: int | None) -> APIError:
        size = f" ({declared} bytes)" if declared is not None else ""
        return APIError(413, f"the request body{size} is larger than the limit of {self.max_body_bytes} bytes "
                             "(setting max_request_body_bytes)", code="request_too_large")

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
        await error_response(error)(scope, receive, send)


def _headers(scope: Scope) -> Mapping[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", ())}
