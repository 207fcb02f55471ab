"""/v1/responses as a stateless adapter over chat (the OpenAI Agents SDK's default API).

`to_chat` maps a Responses request (instructions, input items incl. function calls and their outputs,
function tools, tool_choice, `text.format`) to a ChatCompletionRequest, which then goes through the chat
flow unchanged (template, tools, grammar, admission). The answer comes back as Responses output items: a
`message` with `output_text` and/or `function_call` items; streamed as Responses events
(`response.created` … `response.output_text.delta` … `response.function_call_arguments.delta` …
`response.completed`), each an SSE `event:` + `data:` pair. Nothing is stored: `previous_response_id`
is a 400 and the response says `store: false`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from shrinkserve.server.protocol import openai as P
from shrinkserve.server.protocol.errors import APIError, bad_request
from shrinkserve.server.runtime.types import TokenInfo
from shrinkserve.server.serving.base import Outcome, Run
from shrinkserve.server.serving.chat import ChatPlan
from shrinkserve.server.serving.tools.stream import (
    ContentDelta,
    ToolCallDelta,
    ToolCallParser,
    new_call_id,
    parse_tool_calls,
)

log = logging.getLogger("shrinkserve.responses")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------- request → chat


def _messages(req: P.ResponsesRequest) -> list[P._Message]:
    out: list[P._Message] = []
    if req.instructions:
        out.append(P.SystemMessage(role="system", content=req.instructions))
    items = [P.MessageItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    for item in items:
        if isinstance(item, P.MessageItem):
            out.append(P.chat_message(role=item.role, content=item.text()))
        elif isinstance(item, P.FunctionCallItem):
            call = P.ToolCall(id=item.call_id, function=P.ToolCallFunction(name=item.name, arguments=item.arguments))
            last = out[-1] if out else None
            if isinstance(last, P.AssistantTurn):
                last.tool_calls = [*(last.tool_calls or []), call]  # parallel calls, or text then calls: one turn
            else:
                out.append(P.AssistantTurn(role="assistant", content=None, tool_calls=[call]))
        else:
            out.append(P.ToolMessage(role="tool", content=item.text(), tool_call_id=item.call_id))
    if not out:
        raise bad_request("input is empty: give at least one message", param="input")
    return out


def _tool_choice(choice: Any) -> P.ToolChoiceParam | None:
    if isinstance(choice, P.FunctionChoice):
        return P.NamedToolChoice(type="function", function=P.FunctionName(name=choice.name))
    if isinstance(choice, P.AllowedToolsR):
        refs = [P.AllowedToolRef(type="function", function=P.FunctionName(name=t.name)) for t in choice.tools]
        return P.AllowedToolsChoice(type="allowed_tools", allowed_tools=P.AllowedTools(mode=choice.mode, tools=refs))
    return choice


def _response_format(text: P.TextConfig | None) -> Any:
    fmt = text.format if text is not None else None
    if isinstance(fmt, P.TextFormatJSONObject):
        return P.ResponseFormatJSONObject(type="json_object")
    if isinstance(fmt, P.TextFormatJSONSchema):
        spec = P.JSONSchemaFormat(name=fmt.name, description=fmt.description, schema=fmt.schema_, strict=fmt.strict)
        return P.ResponseFormatJSONSchema(type="json_schema", json_schema=spec)
    return None


def to_chat(req: P.ResponsesRequest) -> P.ChatCompletionRequest:
    tools = None
    if req.tools:
        tools = [P.ToolDefinition(type="function", function=P.FunctionDefinition(
            name=t.name, description=t.description, parameters=t.parameters, strict=t.strict)) for t in req.tools]
    return P.ChatCompletionRequest(
        model=req.model, messages=_messages(req), max_tokens=req.max_output_tokens, temperature=req.temperature,
        top_p=req.top_p, tools=tools, tool_choice=_tool_choice(req.tool_choice),
        parallel_tool_calls=req.parallel_tool_calls, response_format=_response_format(req.text),
        logprobs=req.wants_logprobs, top_logprobs=(req.top_logprobs or 0) if req.wants_logprobs else None,
        stream=req.stream,
    )


# ----------------------------------------------------------------------------- chat → response


def _logprobs(tokens: list[TokenInfo]) -> list[P.ResponseLogprob]:
    return [P.ResponseLogprob(token=t.text, bytes=list(t.bytes), logprob=t.logprob or 0.0,
                              top_logprobs=[P.ResponseTopLogprob(token=a.text, bytes=list(a.bytes),
                                                                 logprob=a.logprob or 0.0) for a in t.top or []])
            for t in tokens]


def _status(finish: str | None) -> tuple[str, P.IncompleteDetails | None]:
    if finish == "length":
        return "incomplete", P.IncompleteDetails(reason="max_output_tokens")
    if finish in ("stop", "tool_calls"):
        return "completed", None
    return "incomplete", P.IncompleteDetails(reason=None)  # aborted (drain) or failed


class Shell:
    """The response object's fields that do not depend on the output."""

    def __init__(self, req: P.ResponsesRequest, model: str) -> None:
        self.req = req
        self.id = _id("resp")
        self.created = int(time.time())
        self.model = model

    def response(self, status: str, output: list[Any], usage: P.ResponseUsage | None = None,
                 incomplete: P.IncompleteDetails | None = None) -> P.ResponseObject:
        req = self.req
        choice = req.tool_choice
        return P.ResponseObject(
            id=self.id, created_at=self.created, status=status, incomplete_details=incomplete,  # type: ignore[arg-type]
            instructions=req.instructions, model=self.model, output=output,
            parallel_tool_calls=req.parallel_tool_calls is not False, temperature=req.temperature, top_p=req.top_p,
            tool_choice=choice.model_dump() if isinstance(choice, P.Strict) else (choice or "auto"),
            tools=[t.model_dump() for t in req.tools or []],
            text=req.text.model_dump(by_alias=True, exclude_none=True) if req.text else {"format": {"type": "text"}},
            max_output_tokens=req.max_output_tokens, top_logprobs=req.top_logprobs, metadata=req.metadata,
            user=req.user, usage=usage,
        )


def _usage(run: Run) -> P.ResponseUsage:
    prompt, completion = run.prepared.prompt_tokens, run.completion_tokens
    return P.ResponseUsage(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion,
                           input_tokens_details=P.InputTokensDetails(cached_tokens=run.cached_tokens))


def response(req: P.ResponsesRequest, plan: ChatPlan, run: Run, outcomes: list[Outcome]) -> P.ResponseObject:
    (out,) = outcomes
    if plan.parses_calls:
        parsed = parse_tool_calls(out.text, plan.fmt)
        content, calls = parsed.content, parsed.tool_calls
        finish = parsed.finish_reason(out.finish_reason or "abort")
    else:
        content, calls, finish = out.text, [], out.finish_reason
    status, incomplete = _status(finish)
    item_status = "completed" if status == "completed" else "incomplete"
    output: list[Any] = []
    if content is not None or not calls:
        part = P.OutputTextPart(text=content or "", logprobs=_logprobs(out.tokens) if req.wants_logprobs else [])
        output.append(P.OutputMessage(id=_id("msg"), status=item_status, content=[part]))
    for c in calls:
        output.append(P.OutputFunctionCall(id=_id("fc"), call_id=c.id, name=c.name, arguments=c.arguments,
                                           status=item_status))
    return Shell(req, run.name).response(status, output, _usage(run), incomplete)


# ----------------------------------------------------------------------------- streaming events


class _Events:
    """Numbered Responses events as SSE (`event:` names the type, as OpenAI's stream does)."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json")


async def events(req: P.ResponsesRequest, plan: ChatPlan, run: Run) -> AsyncGenerator[str, None]:
    shell = Shell(req, run.name)
    ev = _Events()
    yield ev("response.created", response=_dump(shell.response("in_progress", [])))
    yield ev("response.in_progress", response=_dump(shell.response("in_progress", [])))
    output: list[Any] = []  # finished items, in output order
    message: dict[str, Any] | None = None  # the open message item: id, index, text, tokens
    calls: dict[int, dict[str, Any]] = {}  # tool-call index → its open item
    parser = ToolCallParser(plan.fmt) if plan.parses_calls else None
    finish: str | None = None

    def open_message() -> list[str]:
        nonlocal message
        message = {"id": _id("msg"), "index": len(output) + len(calls), "text": "", "tokens": []}
        item = P.OutputMessage(id=message["id"], status="in_progress", content=[])
        part = P.OutputTextPart(text="")
        return [ev("response.output_item.added", output_index=message["index"], item=_dump(item)),
                ev("response.content_part.added", item_id=message["id"], output_index=message["index"],
                   content_index=0, part=_dump(part))]

    def close_message(status: str) -> list[str]:
        nonlocal message
        if message is None:
            return []
        m, message = message, None
        lps = _logprobs(m["tokens"]) if req.wants_logprobs else []
        part = P.OutputTextPart(text=m["text"], logprobs=lps)
        item = P.OutputMessage(id=m["id"], status=status, content=[part])  # type: ignore[arg-type]
        output.append((m["index"], item))
        return [ev("response.output_text.done", item_id=m["id"], output_index=m["index"], content_index=0,
                   text=m["text"], logprobs=[_dump(x) for x in lps]),
                ev("response.content_part.done", item_id=m["id"], output_index=m["index"], content_index=0,
                   part=_dump(part)),
                ev("response.output_item.done", output_index=m["index"], item=_dump(item))]

    def text_delta(text: str, tokens: list[TokenInfo]) -> list[str]:
        out = [] if message is not None else open_message()
        assert message is not None
        message["text"] += text
        message["tokens"] = message["tokens"] + tokens
        lps = _logprobs(tokens) if req.wants_logprobs else []
        out.append(ev("response.output_text.delta", item_id=message["id"], output_index=message["index"],
                      content_index=0, delta=text, logprobs=[_dump(x) for x in lps]))
        return out

    def call_delta(d: ToolCallDelta) -> list[str]:
        out: list[str] = []
        if d.index not in calls:
            out += close_message("completed")
            c = {"id": _id("fc"), "call_id": d.id or new_call_id(), "name": d.name or "", "arguments": "",
                 "index": len(output) + len(calls)}
            calls[d.index] = c
            item = P.OutputFunctionCall(id=c["id"], call_id=c["call_id"], name=c["name"], arguments="",
                                        status="in_progress")
            out.append(ev("response.output_item.added", output_index=c["index"], item=_dump(item)))
        c = calls[d.index]
        if d.arguments:
            c["arguments"] += d.arguments
            out.append(ev("response.function_call_arguments.delta", item_id=c["id"], output_index=c["index"],
                          delta=d.arguments))
        return out

    held: list[TokenInfo] = []  # tokens whose text is not out yet (a stop string or a marker may be forming)
    try:
        async for _, step in run.steps():
            held += step.tokens
            deltas: list[ContentDelta | ToolCallDelta]
            if parser is None:
                deltas = [ContentDelta(step.text)] if step.text else []
            else:
                deltas = parser.feed(step.text)
                if step.finish_reason is not None:
                    deltas += parser.finish()
            for d in deltas:
                for e in (text_delta(d.text, held) if isinstance(d, ContentDelta) else call_delta(d)):
                    yield e
                held = []
            if step.finish_reason is not None:
                finish = step.finish_reason
                if parser is not None:
                    finish = parser.result().finish_reason(finish)
    except APIError as exc:
        yield ev("error", code=exc.code, message=exc.message, param=exc.param)
        return
    except Exception as exc:
        log.exception("responses stream failed")
        yield ev("error", code="server_error", message=f"generation failed: {exc}", param=None)
        return
    status, incomplete = _status(finish)
    item_status = "completed" if status == "completed" else "incomplete"
    for e in close_message(item_status):
        yield e
    for c in calls.values():
        item = P.OutputFunctionCall(id=c["id"], call_id=c["call_id"], name=c["name"], arguments=c["arguments"],
                                    status=item_status)  # type: ignore[arg-type]
        output.append((c["index"], item))
        yield ev("response.function_call_arguments.done", item_id=c["id"], output_index=c["index"],
                 arguments=c["arguments"], name=c["name"])
        yield ev("response.output_item.done", output_index=c["index"], item=_dump(item))
    if not output:  # nothing was generated: one empty message, as the non-streamed response has
        for e in open_message() + close_message(item_status):
            yield e
    final = shell.response(status, [item for _, item in sorted(output, key=lambda x: x[0])], _usage(run), incomplete)
    yield ev("response.completed" if status == "completed" else "response.incomplete", response=_dump(final))
