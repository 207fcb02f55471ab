"""The Lark grammar (llguidance dialect) that bounds an answer under a ``tool_choice`` to text and valid calls."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from shrinkserve.server.runtime.grammar import JSON_OPTIONS
from shrinkserve.server.serving.tools.formats import SMOLLM2, ToolFormat
from shrinkserve.server.serving.tools.validate import ToolChoice, ToolSpec

__all__ = ["tool_grammar"]


def _rewrite_refs(node: Any, prefix: str) -> Any:
    """Move a tool's local ``$ref``s under ``#/$defs/<prefix>…`` (its schema is nested in a bigger one)."""
    if isinstance(node, Mapping):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#"):
                pointer = v[1:]
                m = re.match(r"/(\$defs|definitions)/([^/]+)(.*)", pointer)
                out[k] = f"#/$defs/{prefix}_{m.group(2)}{m.group(3)}" if m else f"#/$defs/{prefix}{pointer}"
            elif k in ("$defs", "definitions"):
                continue  # hoisted by _call_schema
            else:
                out[k] = _rewrite_refs(v, prefix)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix) for v in node]
    return node


def _call_schema(tools: Sequence[ToolSpec], *, min_items: int, max_items: int | None, array: bool
                 ) -> dict[str, Any]:
    """JSON schema of the call(s): ``{"name": const, "arguments": <parameters>}`` for each tool."""
    defs: dict[str, Any] = {}
    alternatives = []
    for i, tool in enumerate(tools):
        prefix = f"tool{i}"
        params = dict(tool.parameters)
        for key in ("$defs", "definitions"):
            for name, sub in (params.get(key) or {}).items():
                defs[f"{prefix}_{name}"] = _rewrite_refs(sub, prefix)
        defs[prefix] = _rewrite_refs(params, prefix)
        alternatives.append({
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": {"$ref": f"#/$defs/{prefix}"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    call = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    # Lenient unless a tool asks for strict: then an unenforceable keyword is a 400, as for response_format.
    options = {**JSON_OPTIONS, "lenient": not any(t.strict for t in tools)}
    if array:
        schema: dict[str, Any] = {"type": "array", "items": call, "minItems": min_items}
        if max_items is not None:
            schema["maxItems"] = max_items
    else:
        schema = dict(call)
    return {**schema, "$defs": defs, "x-guidance": options}


def _lark_str(s: str) -> str:
    return json.dumps(s)


def tool_grammar(choice: ToolChoice, fmt: ToolFormat = SMOLLM2, content: str | None = None) -> str | None:
    """Lark grammar text (llguidance dialect) for the answer under ``choice``; None when unconstrained.

    required / named: the whole answer is the call block(s). auto: any text that does not contain the opening
    marker, or such text followed by the call block(s) (the marker commits the model to a valid call).
    ``content`` (a Lark expression, e.g. ``%json {…}`` from ``response_format``) replaces the free text of
    ``auto``: the answer is then either that or the call block(s).
    """
    if choice.mode == "none" or not choice.tools:
        return None
    op, cl = _lark_str(fmt.open), _lark_str(fmt.close)
    max_calls = None if choice.parallel else 1
    # Free text is anything that does not contain the opening marker (without its layout newline).
    marker = re.escape(fmt.open.strip()).replace("/", "\\/")
    text_rule = f"TEXT: /(?s:.*)/ & ~/(?s:.*){marker}(?s:.*)/"
    if fmt.array:
        # auto may write an empty list (the SmolLM2 prompt asks for '[]' when no call is needed).
        min_items = 1 if choice.mode == "required" else 0
        schema = _call_schema(choice.tools, min_items=min_items, max_items=max_calls, array=True)
        tail, rules = f"calls {cl}", f"calls: %json {json.dumps(schema)}"
    else:
        more = "" if max_calls == 1 else f' ("\\n" {op} call {cl})*'
        schema = _call_schema(choice.tools, min_items=1, max_items=None, array=False)
        tail, rules = f"call {cl}{more}", f"call: %json {json.dumps(schema)}"
    if choice.mode == "required":
        return f"start: {op} {tail}\n{rules}\n"
    if content is not None:
        return f"start: answer | {op} {tail}\nanswer: {content}\n{rules}\n"
    return f"start: TEXT | call_hd {tail}\ncall_hd[lazy]: TEXT {op}\n{text_rule}\n{rules}\n"
