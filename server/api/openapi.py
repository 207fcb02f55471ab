"""`/openapi.json` that describes what the server really does: OpenAI-shaped errors with the statuses the
API answers (400, 401, 404, 413, 429, 503 — never FastAPI's 422), `text/event-stream` beside JSON for the
streaming endpoints, and the bearer scheme when API keys are configured. schemathesis checks responses
against this document (tests/test_api_schemathesis.py)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from shrinkserve.server.api.middleware import ALWAYS_OPEN, DOCS
from shrinkserve.server.protocol.openai import ErrorResponse

STREAMING = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
GENERATING = STREAMING
# OpenAPI before 3.2: the schema of an event-stream media type describes ONE event (as SSE parsers read it).
SSE = {"text/event-stream": {"schema": {
    "type": "object", "description": "one Server-Sent Event: `data` is a JSON chunk (or `[DONE]` for chat and "
    "completions); Responses events also name their type in `event`",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}}, "required": ["data"]}}}

_ERRORS = {
    "400": "Invalid request: a bad or unsupported parameter (named in error.param), malformed JSON, or a prompt "
           "over the context (code context_length_exceeded)",
    "401": "Missing or wrong API key (Authorization: Bearer <key>)",
    "404": "Unknown model (profile)",
    "413": "Request body over max_request_body_bytes",
    "429": "The profile is at capacity (server_busy); Retry-After says when to retry",
    "503": "The profile is not ready or failed its quality gate, or the server is shutting down",
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def _statuses(path: str, method: str, has_model: bool, auth: bool) -> list[str]:
    codes = ["400"]
    if auth:
        codes.append("401")
    if has_model:
        codes.append("404")
    if method in ("post", "put", "patch"):
        codes.append("413")
    if any(path.endswith(p) for p in GENERATING):
        codes.append("429")
    codes.append("503")
    return codes


MODEL_FIELDS = ("ChatCompletionRequest", "CompletionRequest", "ResponsesRequest", "TokenizeRequest",
                "DetokenizeRequest")


def _enum_models(doc: dict[str, Any], models: list[str]) -> None:
    """`model` can only name a configured profile (anything else is a 404): say so in the schema."""
    schemas = doc["components"]["schemas"]
    for name in MODEL_FIELDS:
        prop = schemas.get(name, {}).get("properties", {}).get("model")
        if prop is None:
            continue
        if "anyOf" in prop:  # optional: a profile or null
            prop["anyOf"] = [{"type": "string", "enum": models}, {"type": "null"}]
        else:
            prop.update({"type": "string", "enum": models})
            prop.pop("minLength", None)
    for ops in doc["paths"].values():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param.get("name") in ("model", "model_id"):
                    schema = param["schema"]
                    if "anyOf" in schema:
                        schema["anyOf"] = [{"type": "string", "enum": models}, {"type": "null"}]
                    else:
                        schema.update({"type": "string", "enum": models})


def install_openapi(app: FastAPI, *, auth: bool, models: list[str] | None = None) -> None:
    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        _, defs = models_json_schema([(ErrorResponse, "serialization")], ref_template="#/components/schemas/{model}")
        schemas.update(defs.get("$defs", {}))
        if models:
            _enum_models(doc, models)
        if auth:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                if path in ALWAYS_OPEN or path in DOCS:
                    continue
                if any(path.endswith(p) for p in STREAMING):
                    responses["200"].setdefault("content", {}).update(SSE)
                has_model = method == "post" or "{model_id}" in path or any(
                    p.get("name") == "model" for p in op.get("parameters", []))
                for code in _statuses(path, method, has_model, auth):
                    responses.setdefault(code, _error(_ERRORS[code]))
                if auth:
                    op["security"] = [{"bearer": []}]
        app.openapi_schema = doc
        return doc

    app.openapi = build  # type: ignore[method-assign]
