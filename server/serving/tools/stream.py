"""Generated text → content and OpenAI ``tool_calls``: incrementally for streaming, and at once through the same
parser, so the streamed pieces always concatenate to the non-streamed answer."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from shrinkserve.server.serving.tools.formats import SMOLLM2, ToolFormat

__all__ = [
    "ContentDelta",
    "Delta",
    "ParsedToolOutput",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "new_call_id",
    "parse_tool_calls",
]


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
