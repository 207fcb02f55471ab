"""schemathesis hooks for the conformance run (tests/test_api_schemathesis.py): every generated request
asks for at most a few tokens, so a case costs milliseconds, not a full-context generation."""

from __future__ import annotations

from typing import Any

import schemathesis

MAX_TOKENS = 4


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    path = case.operation.path
    if path.endswith("/v1/responses"):
        keys = ("max_output_tokens",)
    elif path.endswith("/v1/chat/completions"):
        keys = ("max_completion_tokens", "max_tokens")  # the first one set wins on the server
    elif path.endswith("/v1/completions"):
        keys = ("max_tokens",)
    else:
        return
    if all(body.get(k) is None for k in keys):
        body[keys[-1]] = MAX_TOKENS  # unset would mean "the rest of the context"
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[key] = MAX_TOKENS
