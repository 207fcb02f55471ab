"""The output constraint a request asks for: OpenAI's `response_format`, vLLM's `structured_outputs` and
`guided_*`, and tool calls → one llguidance grammar, compiled once per request before admission.

`structure_of(req)` reads the request (the protocol layer already allows at most one of these fields);
`compile_constraint(...)` combines it with the tool-call grammar and compiles it with the engine's
GrammarTokenizer (cached per engine and per grammar text). It runs in a worker thread: building the
grammar tokenizer takes ~0.5 s the first time, compiling a large schema up to ~1 s. Every problem with
the client's schema/grammar raises `GrammarError` / `ToolsError`, which the API turns into a 400
naming the parameter before any response byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shrinkserve.server.engines.base import Tokenizer
from shrinkserve.server.protocol import openai as P
from shrinkserve.server.runtime.grammar import (
    JSON_OPTIONS,
    GrammarError,
    grammar_tokenizer,
    json_object_grammar,
    json_schema_grammar,
    json_schema_lark,
    lark_grammar,
)
from shrinkserve.server.runtime.types import TokenConstraint
from shrinkserve.server.serving.tools.formats import SMOLLM2, ToolFormat
from shrinkserve.server.serving.tools.grammar import tool_grammar
from shrinkserve.server.serving.tools.validate import ToolChoice

__all__ = ["Structure", "compile_constraint", "structure_of"]


@dataclass(frozen=True)
class Structure:
    """One request's output constraint, as llguidance grammar text."""

    grammar: str
    param: str  # the request field it came from: a 400 names it
    # The same constraint as a Lark expression when it is JSON, so tool calls can be offered beside it.
    lark: str | None = None


def _schema(value: dict[str, Any] | str, param: str) -> dict[str, Any]:
    if isinstance(value, str):  # vLLM accepts the schema as JSON text too
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise GrammarError(f"{param} is not valid JSON: {exc}", param) from None
    if not isinstance(value, dict):
        raise GrammarError(f"{param} must be a JSON schema object", param)
    return value


def _json(schema: dict[str, Any], strict: bool | None, param: str) -> Structure:
    return Structure(json_schema_grammar(schema, strict=strict, param=param), param,
                     json_schema_lark(schema, strict=strict, param=param))


def _json_object(param: str) -> Structure:
    lark = "%json " + json.dumps({"type": "object", "x-guidance": {**JSON_OPTIONS, "lenient": True}})
    return Structure(json_object_grammar(), param, lark)


def _choice(options: list[str], param: str) -> Structure:
    return Structure(lark_grammar("start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options),
                                  param=param), param)


def _regex(pattern: str, param: str) -> Structure:
    import llguidance as llg

    return Structure(llg.LLMatcher.grammar_from_regex(pattern), param)


def structure_of(req: P._SamplingRequest) -> Structure | None:
    """The request's constraint on the whole output, or None for free text."""
    rf = req.response_format
    if isinstance(rf, P.ResponseFormatJSONObject):
        return _json_object("response_format")
    if isinstance(rf, P.ResponseFormatJSONSchema):
        spec = rf.json_schema
        param = "response_format.json_schema.schema"
        return _json(spec.schema_ if spec.schema_ is not None else {"type": "object"}, spec.strict, param)
    so = req.structured_outputs
    if so is not None:
        if so.json_ is not None:
            return _json(_schema(so.json_, "structured_outputs.json"), None, "structured_outputs.json")
        if so.json_object:
            return _json_object("structured_outputs.json_object")
        if so.regex is not None:
            return _regex(so.regex, "structured_outputs.regex")
        if so.choice is not None:
            return _choice(so.choice, "structured_outputs.choice")
        if so.grammar is not None:
            return Structure(lark_grammar(so.grammar, param="structured_outputs.grammar"), "structured_outputs.grammar")
    if req.guided_json is not None:
        return _json(_schema(req.guided_json, "guided_json"), None, "guided_json")
    if req.guided_regex is not None:
        return _regex(req.guided_regex, "guided_regex")
    if req.guided_choice is not None:
        return _choice(req.guided_choice, "guided_choice")
    if req.guided_grammar is not None:
        return Structure(lark_grammar(req.guided_grammar, param="guided_grammar"), "guided_grammar")
    return None


def compile_constraint(
    tok: Tokenizer, structure: Structure | None, tools: ToolChoice | None = None, fmt: ToolFormat = SMOLLM2,
) -> Callable[[], TokenConstraint] | None:
    """A factory of per-sequence constraints (one per choice: they are stateful), or None when the output is free.

    With tools in play (`tool_choice` auto/required/named), the tool grammar decides: `required`/named allow
    only calls; `auto` allows calls or the answer — free text, or the `response_format` JSON when given.
    """
    grammar, param = (structure.grammar, structure.param) if structure is not None else (None, None)
    if tools is not None and tools.mode != "none":
        if structure is not None and structure.lark is None:
            raise GrammarError(f"{structure.param} cannot be combined with tools; use response_format "
                               "json_schema or json_object", structure.param)
        lark = tool_grammar(tools, fmt, content=structure.lark if structure is not None else None)
        if lark is not None:
            grammar, param = lark_grammar(lark, param="tools"), "tools"
    if grammar is None:
        return None
    compiled = grammar_tokenizer(tok).compile(grammar, param=param)  # type: ignore[arg-type]
    return compiled.new_constraint
