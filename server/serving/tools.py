"""Tools in chat: OpenAI ``tools``/``tool_choice`` → prompt, grammar and parsed ``tool_calls``.

Pure functions and small classes over strings and dicts; no engine, no HTTP. The flow for one request:

1. ``parse_tools(tools)`` and ``parse_tool_choice(tool_choice, tools, parallel_tool_calls)`` validate the
   request (``ToolsError`` → 400 with ``param``).
2. ``render_chat(messages, chat_template=…, tools=…, choice=…)`` renders the conversation, including assistant
   ``tool_calls`` and ``tool`` results in the history: through the model's own template when it takes
   ``tools`` (``template_supports_tools``), else with the SmolLM2 convention (``SMOLLM2_TOOL_PROMPT``).
3. ``tool_grammar(tools, choice, fmt)`` gives the Lark grammar (for server/runtime/grammar.py's
   ``lark_grammar`` → ``GrammarTokenizer.compile``) that the output must follow: ``required``/named → nothing but
   a tool call; ``auto`` → free text, or a tool call once the model writes ``<tool_call>``; ``none`` → None.
4. ``ToolCallParser`` turns the generated text into OpenAI ``tool_calls`` — incrementally for streaming
   (``feed``/``finish`` → content and tool-call deltas with ``index``) and, through the same code, at once
   (``parse_tool_calls``), so the streamed pieces always concatenate to the non-streamed answer.

The output format (``ToolFormat``) is SmolLM2's ``<tool_call>[{"name": …, "arguments": {…}}, …]</tool_call>``
unless a tools-aware template writes Hermes/Qwen blocks (``<tool_call>\\n{…}\\n</tool_call>``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from shrinkserve.server.runtime.grammar import JSON_OPTIONS

__all__ = [
    "HERMES",
    "SMOLLM2",
    "SMOLLM2_TOOL_PROMPT",
    "ContentDelta",
    "ParsedToolOutput",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "ToolChoice",
    "ToolFormat",
    "ToolSpec",
    "ToolsError",
    "detect_tool_format",
    "new_call_id",
    "parse_tool_calls",
    "parse_tool_choice",
    "parse_tools",
    "render_chat",
    "template_supports_tools",
    "tool_grammar",
]

_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's documented maximum number of functions per request


class ToolsError(ValueError):
    """The request's tools, tool_choice or tool messages are invalid: 400 naming ``param``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# --------------------------------------------------------------------------- request validation


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


# --------------------------------------------------------------------------- formats and prompt


@dataclass(frozen=True)
class ToolFormat:
    """How calls appear in the model's text."""

    name: str
    open: str
    close: str
    array: bool  # one block holding a JSON array of calls (SmolLM2) vs one block per call (Hermes)


SMOLLM2 = ToolFormat("smollm2", "<tool_call>", "</tool_call>", array=True)
HERMES = ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", array=False)

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


def template_supports_tools(chat_template: str | None) -> bool:
    """Whether the Jinja chat template reads a ``tools`` variable (HF's convention for tool-aware templates)."""
    if not chat_template:
        return False
    from jinja2 import Environment, TemplateSyntaxError, meta

    try:
        return "tools" in meta.find_undeclared_variables(Environment().parse(chat_template))
    except TemplateSyntaxError:
        return False


def detect_tool_format(chat_template: str | None) -> ToolFormat:
    """Hermes blocks for tools-aware templates that write ``<tool_call>`` with one JSON object; else SmolLM2."""
    if template_supports_tools(chat_template) and "<tool_call>" in (chat_template or "") and (
            "<tool_call>[" not in (chat_template or "")):
        return HERMES
    return SMOLLM2


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


# --------------------------------------------------------------------------- grammar


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


# --------------------------------------------------------------------------- parsing


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON string, as OpenAI's message.tool_calls[].function.arguments

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed piece of call ``index``: the first carries id and name, later ones argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def as_openai(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            d["id"] = self.id
            d["type"] = "function"
        fn: dict[str, Any] = {}
        if self.name is not None:
            fn["name"] = self.name
        fn["arguments"] = self.arguments
        d["function"] = fn
        return d


Delta = ContentDelta | ToolCallDelta


@dataclass
class ParsedToolOutput:
    content: str | None  # text outside tool calls (None when empty/whitespace only)
    tool_calls: list[ToolCall] = field(default_factory=list)
    complete: bool = True  # every opened call block was closed and parsed

    def finish_reason(self, engine_reason: str) -> str:
        """OpenAI's finish_reason: "tool_calls" when the answer is complete calls, else the engine's."""
        return "tool_calls" if self.tool_calls and self.complete and engine_reason == "stop" else engine_reason


class _Call:
    def __init__(self, index: int) -> None:
        self.index = index
        self.id: str | None = None
        self.name: str | None = None
        self.args_start: int | None = None  # offset in the parser's block buffer where arguments start
        self.args_end: int | None = None
        self.args_is_string = False
        self.done = False  # the call's object closed
        self.closed_block = False  # ... and so did its block (the closing marker was seen)
        self.args_container = False  # arguments are an object/array: streamed as they arrive
        self.sent = 0  # argument characters already streamed
        self.announced = False


class ToolCallParser:
    """Incremental parser of model text into content and tool calls (OpenAI streaming deltas).

    ``feed(text)`` returns the deltas that text makes certain; ``finish()`` flushes the rest; ``result()``
    is the whole answer. Text that might be the start of the opening marker is held back until it is not,
    and whitespace right before a call is dropped (layout, not content). ``arguments`` are the raw JSON
    text of each call's arguments (or the string's value when the model wrote them as a JSON string), so
    the streamed fragments concatenate to exactly the final value. Output that opens a call block and then
    is not a call (only possible without a grammar) turns back into content from the marker on.
    """

    def __init__(self, fmt: ToolFormat = SMOLLM2, id_factory: Callable[[], str] = new_call_id) -> None:
        self.fmt = fmt
        self._id = id_factory
        self._open = fmt.open.strip()  # markers are matched without their surrounding newlines
        self._close = fmt.close.strip()
        self._state: Literal["text", "block", "after_value", "passthrough"] = "text"
        self._pending = ""  # text not yet emitted as content (it might start a marker)
        self._content: list[str] = []
        self._calls: list[_Call] = []
        # The JSON of every block, concatenated: call offsets stay valid across blocks.
        self._buf = ""
        self._pos = 0
        self._block_raw = ""  # the current block's text from its marker on (for the fallback to content)
        self._stack: list[str] = []
        self._in_string = False
        self._escape = False
        self._string_start = 0
        self._expect_key = False
        self._key: str | None = None
        self._value_key: str | None = None
        self._call_depth = 1
        self._current: _Call | None = None
        self._open_blocks = False  # a block is open (not yet closed) at the end

    # -- public ----------------------------------------------------------------------------------

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        if not text:
            return out
        if self._state == "passthrough":
            self._emit_content(text, out)
        elif self._state == "text":
            self._pending += text
            self._scan_text(out)
        else:
            self._buf += text
            self._block_raw += text
            self._scan_block(out)
        return out

    def finish(self) -> list[Delta]:
        out: list[Delta] = []
        if self._state == "text" and self._pending:
            self._emit_content(self._pending, out)
            self._pending = ""
        elif self._state in ("block", "after_value"):
            self._open_blocks = True  # truncated inside a call (finish_reason "length")
            self._flush_args(out)
        return out

    def result(self) -> ParsedToolOutput:
        content = "".join(self._content)
        calls = [ToolCall(c.id or "", c.name, self._args(c)) for c in self._calls if c.name is not None]
        return ParsedToolOutput(content=content if content.strip() else None, tool_calls=calls,
                                complete=not self._open_blocks and all(c.done for c in self._calls))

    # -- text outside calls ----------------------------------------------------------------------

    def _emit_content(self, text: str, out: list[Delta]) -> None:
        if text:
            self._content.append(text)
            out.append(ContentDelta(text))

    def _scan_text(self, out: list[Delta]) -> None:
        p = self._pending
        i = p.find(self._open)
        if i >= 0:
            self._emit_content(p[:i].rstrip(), out)
            self._pending = ""
            self._state = "block"
            self._start_block()
            rest = p[i + len(self._open):]
            self._block_raw = p[i:]
            self._buf += rest
            self._scan_block(out)
            return
        hold = 0
        for k in range(min(len(self._open) - 1, len(p)), 0, -1):
            if self._open.startswith(p[-k:]):
                hold = k
                break
        stripped = p[: len(p) - hold].rstrip()
        self._emit_content(stripped, out)
        self._pending = p[len(stripped):]

    # -- inside a block --------------------------------------------------------------------------

    def _start_block(self) -> None:
        self._stack = []
        self._in_string = False
        self._escape = False
        self._current = None
        self._key = None
        self._value_key = None
        self._expect_key = False

    def _fail(self, out: list[Delta]) -> None:
        """Not a call after all: drop the calls of this block and emit the block's text as content."""
        self._calls = [c for c in self._calls if c.closed_block]
        self._state = "passthrough"
        self._emit_content(self._block_raw, out)
        self._block_raw = ""

    def _scan_block(self, out: list[Delta]) -> None:
        while self._pos < len(self._buf):
            if self._state == "after_value":
                rest = self._buf[self._pos:]
                stripped = rest.lstrip()
                if not stripped:
                    self._pos = len(self._buf)
                    break
                if stripped.startswith(self._close):
                    tail = stripped[len(self._close):]
                    self._buf = self._buf[: self._pos]
                    for c in self._calls:
                        c.closed_block = True
                    self._flush_args(out)
                    self._state = "text"
                    self._block_raw = ""
                    self._pending = tail
                    self._scan_text(out)
                    return
                if self._close.startswith(stripped):
                    break  # the closing marker is still arriving
                self._fail(out)
                return
            if not self._step(self._buf[self._pos], out):
                self._fail(out)
                return
            self._pos += 1
        self._flush_args(out)

    def _step(self, ch: str, out: list[Delta]) -> bool:
        """Advance the JSON scan by one character; False when the block is not a call."""
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                return self._end_string(self._buf[self._string_start: self._pos + 1])
            return True
        if ch.isspace():
            return True
        depth = len(self._stack)
        if depth == 0:  # the block's value: a list of calls (SmolLM2) or one call
            if ch == "[" and self.fmt.array:
                self._call_depth = 2
                self._stack.append(ch)
                return True
            if ch != "{":
                return False
            self._call_depth = 1
        if depth == self._call_depth - 1:  # between calls
            if ch == "{":
                self._current = _Call(len(self._calls))
                self._calls.append(self._current)
                self._expect_key = True
                self._value_key = None
                self._stack.append(ch)
                return True
            if depth > 0 and ch == ",":
                return True
            if depth > 0 and ch == "]":
                self._stack.pop()
                self._state = "after_value"
                return True
            return False
        c = self._current
        if c is None:
            return False
        at_call = depth == self._call_depth
        in_args = at_call and self._value_key in ("arguments", "parameters")
        if ch == '"':
            self._in_string = True
            self._string_start = self._pos
            if in_args:
                self._begin_args(c, is_string=True)
            return True
        if ch in "{[":
            if in_args and c.args_start is None:
                self._begin_args(c, is_string=False)
                c.args_container = True
            self._stack.append(ch)
            return True
        if ch in "}]":
            if {"}": "{", "]": "["}[ch] != self._stack[-1]:
                return False
            self._stack.pop()
            depth = len(self._stack)
            if depth == self._call_depth and in_args is False and self._value_key in ("arguments", "parameters") and (
                    c.args_start is not None and c.args_end is None):
                c.args_end = self._pos + 1  # the arguments object/array just closed
                self._value_key = None
            elif depth == self._call_depth - 1:  # the call's object closed
                self._end_primitive(c)
                if c.name is None:
                    return False
                c.done = True
                self._current = None
                if depth == 0:
                    self._state = "after_value"
            return True
        if at_call:
            if ch == ":" and self._expect_key:
                self._expect_key = False
                self._value_key = self._key
                return True
            if ch == ",":
                self._end_primitive(c)
                self._expect_key = True
                self._value_key = None
                return True
            if in_args and c.args_start is None:  # arguments written as a bare number/true/null
                self._begin_args(c, is_string=False)
        return True

    def _begin_args(self, c: _Call, *, is_string: bool) -> None:
        if c.args_start is None:
            c.args_start = self._pos
            c.args_is_string = is_string

    def _end_primitive(self, c: _Call) -> None:
        if c.args_start is not None and c.args_end is None and not c.args_is_string:
            c.args_end = self._pos

    def _end_string(self, raw: str) -> bool:
        if len(self._stack) != self._call_depth or self._current is None:
            return True
        c = self._current
        if self._expect_key:
            self._key = json.loads(raw)
            return True
        if self._value_key == "name":
            name = json.loads(raw)
            if c.name is not None:
                return False
            c.name = name
            c.id = self._id()
            self._value_key = None
        elif self._value_key in ("arguments", "parameters") and c.args_is_string and c.args_end is None:
            c.args_end = self._pos + 1
            self._value_key = None
        return True

    def _args(self, c: _Call) -> str:
        if c.args_start is None:
            return "{}" if c.done else ""
        if c.args_is_string:
            return json.loads(self._buf[c.args_start: c.args_end]) if c.args_end is not None else ""
        end = c.args_end if c.args_end is not None else len(self._buf)
        text = self._buf[c.args_start: end]
        return text.rstrip() if c.args_end is not None else text

    def _flush_args(self, out: list[Delta]) -> None:
        for c in self._calls:
            if c.name is None:
                continue
            if not c.announced:
                c.announced = True
                out.append(ToolCallDelta(c.index, id=c.id, name=c.name, arguments=""))
            if c.args_start is None and not c.done:
                continue
            if c.args_end is None and not c.args_container:
                continue  # a string or bare value is only known once it ends
            text = self._args(c)
            if len(text) > c.sent:
                out.append(ToolCallDelta(c.index, arguments=text[c.sent:]))
                c.sent = len(text)


def parse_tool_calls(text: str, fmt: ToolFormat = SMOLLM2, id_factory: Callable[[], str] = new_call_id
                     ) -> ParsedToolOutput:
    """The whole generated text → content and tool calls (the same parser the stream uses)."""
    p = ToolCallParser(fmt, id_factory)
    p.feed(text)
    p.finish()
    return p.result()
