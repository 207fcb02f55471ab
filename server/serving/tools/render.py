"""A conversation with tools, tool calls and tool results → prompt text.

Through the model's own chat template when it reads ``tools``; else with the SmolLM2 convention (a system
block listing the tools, calls as ``<tool_call>[…]</tool_call>`` text, results as ``<tool_response>`` turns).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from shrinkserve.server.serving.tools.formats import SMOLLM2, ToolFormat, template_supports_tools
from shrinkserve.server.serving.tools.validate import ToolChoice, ToolsError, ToolSpec

__all__ = ["SMOLLM2_TOOL_PROMPT", "format_calls", "render_chat"]

# SmolLM2's documented function-calling prompt (the tools system block of the SmolLM2 family's chat
# template as published with its tool-calling release and used by Ollama's smollm2 model).
SMOLLM2_TOOL_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the functions can be used, point it out and refuse to answer.\n"
    "If the given question lacks the parameters required by the function, also point it out.\n"
    "You have access to the following tools:\n"
    "<tools>{tools}</tools>\n"
    "The output MUST strictly adhere to the following format, and NO other text MUST be included.\n"
    "The example format is as follows. Please make sure the parameter type is correct. If no function call is "
    "needed, please make the tool calls an empty list '[]'.\n"
    "<tool_call>[\n"
    '{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},\n'
    "(more tool calls as required)\n"
    "]</tool_call>"
)


def _content_text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") not in ("text", "input_text", "output_text") or (
                    not isinstance(part.get("text"), str)):
                raise ToolsError(f"{param}[{j}]: only text content parts are supported", f"{param}[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise ToolsError(f"{param} must be a string or an array of text parts", param)


def _arguments_value(arguments: Any) -> Any:
    """A history call's ``arguments`` (a JSON string in OpenAI's shape) as a JSON value when it parses."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments  # clients may send anything; the model sees it as a string
    return arguments


def _history_calls(message: Mapping[str, Any], param: str) -> list[tuple[str, Any, str | None]]:
    calls = message.get("tool_calls") or []
    if not isinstance(calls, Sequence):
        raise ToolsError(f"{param}.tool_calls must be an array", f"{param}.tool_calls")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ToolsError(f"{param}.tool_calls[{k}] needs function.name", f"{param}.tool_calls[{k}]")
        out.append((fn["name"], _arguments_value(fn.get("arguments", "{}")), call.get("id")))
    return out


def format_calls(calls: Sequence[tuple[str, Any]], fmt: ToolFormat = SMOLLM2) -> str:
    """Tool calls written the way the model is asked to write them (history rendering, tests)."""
    items = [json.dumps({"name": n, "arguments": a}, ensure_ascii=False) for n, a in calls]
    if fmt.array:
        return f"{fmt.open}[{', '.join(items)}]{fmt.close}"
    return "\n".join(f"{fmt.open}{item}{fmt.close}" for item in items)


def _convention_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec], list_tools: bool
                         ) -> list[dict[str, str]]:
    """OpenAI messages → plain {role, content} for a template without tool support (SmolLM2 convention)."""
    out: list[dict[str, str]] = []
    system_parts: list[str] = []
    if list_tools and tools:
        listing = json.dumps([t.as_openai() for t in tools], ensure_ascii=False)
        system_parts.append(SMOLLM2_TOOL_PROMPT.format(tools=listing))
    body: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        role = m.get("role")
        text = _content_text(m.get("content"), f"{param}.content")
        if role in ("system", "developer") and not body:
            # Leading system prompts merge into the one system block the template renders first.
            system_parts.append(text)
        elif role in ("system", "developer", "user"):
            body.append({"role": "system" if role == "developer" else str(role), "content": text})
        elif role == "assistant":
            calls = _history_calls(m, param)
            if calls:
                written = format_calls([(n, a) for n, a, _ in calls])
                text = f"{text}\n{written}" if text else written
            body.append({"role": "assistant", "content": text})
        elif role == "tool":
            # As SmolLM2's tool template does it: the result goes back as a user turn.
            body.append({"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
        else:
            raise ToolsError(f"{param}.role {role!r} is not supported", f"{param}.role")
    if system_parts:
        out.append({"role": "system", "content": "\n\n".join(p for p in system_parts if p)})
    return out + body


def _native_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages → HF chat-template messages (tool_calls with dict arguments, tool role kept)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        role = m.get("role")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": _content_text(m.get("content"), f"{param}.content")}
        if role == "assistant":
            calls = _history_calls(m, param)
            if calls:
                msg["tool_calls"] = [{"type": "function", "id": cid, "function": {"name": n, "arguments": a}}
                                     for n, a, cid in calls]
        elif role == "tool":
            if m.get("tool_call_id") is not None:
                msg["tool_call_id"] = m["tool_call_id"]
            if m.get("name") is not None:
                msg["name"] = m["name"]
        out.append(msg)
    return out


def render_chat(
    messages: Sequence[Mapping[str, Any]], *, chat_template: str, tools: Sequence[ToolSpec] = (),
    choice: ToolChoice | None = None, bos_token: str = "", eos_token: str = "",
) -> str:
    """Prompt text for a conversation that may carry tools, tool calls and tool results.

    A template that reads ``tools`` gets them (and the history in HF's shape). Any other template gets the
    SmolLM2 convention: a system block listing the tools, calls as ``<tool_call>[…]</tool_call>`` text in
    assistant turns, results as ``<tool_response>`` user turns. With ``tool_choice: none`` the convention's
    block is left out: it tells the model to answer with nothing but a call.
    """
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    mode = choice.mode if choice is not None else ("auto" if tools else "none")
    kwargs: dict[str, Any] = {}
    if template_supports_tools(chat_template):
        conversation: list[dict[str, Any]] = _native_messages(messages)
        if tools and mode != "none":
            kwargs["tools"] = [t.as_openai() for t in tools]
    else:
        conversation = _convention_messages(messages, tools, list_tools=mode != "none")  # type: ignore[assignment]
    try:
        rendered, _ = render_jinja_template([conversation], chat_template=chat_template, add_generation_prompt=True,
                                            bos_token=bos_token, eos_token=eos_token, **kwargs)
    except TemplateError as exc:
        raise ToolsError(f"the chat template rejected these messages: {exc}", "messages") from exc
    return rendered[0]
