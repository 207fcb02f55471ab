"""Errors in OpenAI's JSON shape, with the status codes OpenAI clients expect."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shrinkserve.server.protocol.errors import APIError, bad_request

log = logging.getLogger("shrinkserve.api")


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: a string that slipped through with a lone surrogate becomes "?" instead
    of a UnicodeEncodeError (a 500) while the error response itself is rendered."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", errors="replace")


def error_response(exc: APIError) -> JSONResponse:
    return SafeJSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def not_ready(profile: str, why: str) -> APIError:
    return APIError(503, f"profile {profile!r} is not ready: {why}", code="profile_not_ready",
                    headers={"Retry-After": "5"})


# ----------------------------------------------------------------------------- validation errors → 400

# Parts of a pydantic error location that name a union member, not a field: "str", "list[str]",
# "function-after[...]", a model class name, "[key]".
_SCALAR_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list", "json-or-python", "lax-or-strict"})
_LOGGED_UNKNOWN: set[str] = set()
_LOGGED_LOCK = threading.Lock()


# Discriminated unions add the tag of the member to the location: a role after a message index, a type
# after a content-part index or after `response_format` / `text.format`.
_ITEM_TAGS = frozenset({"system", "developer", "user", "assistant", "tool", "message", "function_call",
                        "function_call_output", "input_text", "output_text"})
_FORMAT_TAGS = frozenset({"text", "json_object", "json_schema"})
_TAGGED_FIELDS = frozenset({"response_format", "format"})


def param_path(loc: Sequence[Any]) -> str | None:
    """`("messages", 0, "user", "content")` → `messages[0].content`, without pydantic's union-member tags."""
    out: list[str] = []
    prev: Any = None
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out.append(f"[{part}]")
            prev = part
            continue
        s = str(part)
        tag = (s in _ITEM_TAGS and isinstance(prev, int)) or (s in _FORMAT_TAGS and prev in _TAGGED_FIELDS)
        if tag or s in _SCALAR_TAGS or "[" in s or "(" in s or s[:1].isupper():
            prev = None if tag else prev
            continue  # a union member's tag, not a field
        out.append(("." if out else "") + s)
        prev = s
    return "".join(out) or None


def _most_specific(errors: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """Of the errors on the first failing field, the deepest one (a union reports one error per member;
    the member that got furthest names the real problem)."""
    first = errors[0]
    head = first.get("loc", ("",))[:2]
    same = [e for e in errors if tuple(e.get("loc", ()))[:2] == tuple(head)]
    unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:  # an unknown field is the clearest thing to report
        return unknown[0]
    return max(same, key=lambda e: len(e.get("loc", ())))


def _log_unknown_once(param: str) -> None:
    name = re.sub(r"\[\d+\]", "[]", param)
    with _LOGGED_LOCK:
        if name in _LOGGED_UNKNOWN:
            return
        _LOGGED_UNKNOWN.add(name)
    log.warning("request field %r is unknown to shrinkserve: answered 400 (logged once per field)", name)


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """pydantic errors → one 400 naming the parameter (OpenAI's shape; never FastAPI's 422)."""
    if not errors:
        return bad_request("invalid request")
    err = _most_specific(errors)
    kind = err.get("type")
    if kind == "json_invalid":
        return bad_request("request body is not valid JSON")
    loc = tuple(err.get("loc", ()))
    param = param_path(loc)
    if kind == "extra_forbidden":
        param = param if param is not None else str(loc[-1] if loc else "")
        _log_unknown_once(param)
        return bad_request(f"unknown parameter {param!r}: shrinkserve does not implement it (see "
                           "docs/openai-fields.md)", param=param, code="unknown_parameter")
    if kind == "missing":
        return bad_request(f"{param}: this field is required", param=param)
    msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    return bad_request(f"{param}: {msg}" if param else msg, param=param)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = exc.body
        if isinstance(body, dict) and isinstance(body.get("model"), str) and "profile" not in request.state._state:
            request.state.profile = body["model"]  # the request counter's label, when it names a profile
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)))
