"""OpenAI ``tools`` and ``tool_choice`` validated into ``ToolSpec``/``ToolChoice`` (``ToolsError`` → 400)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["MAX_TOOLS", "ToolChoice", "ToolSpec", "ToolsError", "parse_tool_choice", "parse_tools"]

_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's documented maximum number of functions per request


class ToolsError(ValueError):
    """The request's tools, tool_choice or tool messages are invalid: 400 naming ``param``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str | None
    parameters: Mapping[str, Any]  # a JSON schema for the arguments object
    strict: bool | None = None

    def as_openai(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = dict(self.parameters)
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["none", "auto", "required"]
    tools: tuple[ToolSpec, ...]  # the tools the output may call (a named choice: exactly one)
    parallel: bool = True  # parallel_tool_calls: more than one call in one answer
    named: bool = False  # the client named the function: a call to it is forced


def parse_tools(tools: Sequence[Mapping[str, Any]] | None) -> tuple[ToolSpec, ...]:
    """Validate OpenAI ``tools`` (function tools only) into ToolSpecs."""
    if tools is None:
        return ()
    if not isinstance(tools, Sequence) or isinstance(tools, str | bytes):
        raise ToolsError("tools must be an array", "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolsError(f"at most {MAX_TOOLS} tools are supported", "tools")
    out: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise ToolsError(f"{param} must be an object", param)
        if tool.get("type") != "function":
            raise ToolsError(f"{param}.type {tool.get('type')!r} is not supported; only 'function' tools are",
                             f"{param}.type")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise ToolsError(f"{param}.function must be an object", f"{param}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ToolsError(f"{param}.function.name must match ^[a-zA-Z0-9_-]{{1,64}}$", f"{param}.function.name")
        if name in seen:
            raise ToolsError(f"{param}: duplicate function name {name!r}", f"{param}.function.name")
        seen.add(name)
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolsError(f"{param}.function.description must be a string", f"{param}.function.description")
        # OpenAI: "Omitting parameters defines a function with an empty parameter list."
        parameters = fn.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise ToolsError(f"{param}.function.parameters must be a JSON schema object",
                             f"{param}.function.parameters")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ToolsError(f"{param}.function.strict must be a boolean", f"{param}.function.strict")
        out.append(ToolSpec(name, description, parameters, strict))
    return tuple(out)


def parse_tool_choice(tool_choice: Any, tools: Sequence[ToolSpec], parallel_tool_calls: bool | None = None
                      ) -> ToolChoice:
    """OpenAI ``tool_choice`` (``none``/``auto``/``required``, a named function, or ``allowed_tools``)."""
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    if tool_choice is None:
        return ToolChoice("auto" if tools else "none", tuple(tools), parallel)
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ToolsError(f"tool_choice must be 'none', 'auto', 'required' or an object, not {tool_choice!r}",
                             "tool_choice")
        if tool_choice == "required" and not tools:
            raise ToolsError("tool_choice 'required' needs tools", "tool_choice")
        mode: Literal["none", "auto", "required"] = tool_choice  # type: ignore[assignment]
        return ToolChoice(mode if tools else "none", tuple(tools), parallel)
    if not isinstance(tool_choice, Mapping):
        raise ToolsError("tool_choice must be a string or an object", "tool_choice")
    by_name = {t.name: t for t in tools}
    kind = tool_choice.get("type")
    if kind == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str):
            raise ToolsError("tool_choice.function.name is required", "tool_choice.function.name")
        if name not in by_name:
            raise ToolsError(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
        return ToolChoice("required", (by_name[name],), parallel=False, named=True)
    if kind == "allowed_tools":
        spec = tool_choice.get("allowed_tools")
        if not isinstance(spec, Mapping) or spec.get("mode") not in ("auto", "required"):
            raise ToolsError("tool_choice.allowed_tools needs mode 'auto' or 'required' and tools",
                             "tool_choice.allowed_tools")
        chosen: list[ToolSpec] = []
        for ref in spec.get("tools") or ():
            fn = ref.get("function") if isinstance(ref, Mapping) else None
            name = fn.get("name") if isinstance(fn, Mapping) else None
            if ref.get("type") != "function" or name not in by_name:  # type: ignore[union-attr]
                raise ToolsError(f"tool_choice.allowed_tools lists an unknown tool {ref!r}",
                                 "tool_choice.allowed_tools.tools")
            chosen.append(by_name[name])  # type: ignore[index]
        if not chosen:
            raise ToolsError("tool_choice.allowed_tools.tools is empty", "tool_choice.allowed_tools.tools")
        return ToolChoice(spec["mode"], tuple(chosen), parallel)
    raise ToolsError(f"tool_choice type {kind!r} is not supported (use 'function' or 'allowed_tools')",
                     "tool_choice.type")
