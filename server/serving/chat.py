"""/v1/chat/completions ↔ generation requests: the model's own chat template, tools, structured outputs,
chat logprobs.

Without tools the conversation goes through the model's template as is. With `tools` (or tool calls and
results in the history) serving/tools/ renders it — through the template when it takes `tools`, else
with SmolLM2's convention — and, unless `tool_choice` is "none", a grammar bounds the answer to free text
(or the `response_format`) and/or valid calls; the text is then parsed back into `message.tool_calls`
(streamed as deltas with `index`), and a complete answer made of calls ends with finish_reason "tool_calls".
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from shrinkserve.server.engines.base import Tokenizer
from shrinkserve.server.protocol import openai as P
from shrinkserve.server.protocol.errors import bad_request
from shrinkserve.server.runtime.registry import ProfileRuntime
from shrinkserve.server.runtime.types import TokenInfo
from shrinkserve.server.serving.base import (
    Outcome,
    Prepared,
    Run,
    choices,
    client_errors,
    context_of,
    max_tokens,
    sampling_params,
    tokenizer_of,
    usage,
)
from shrinkserve.server.serving.sse import TextChunks, sse_data
from shrinkserve.server.serving.structured import compile_constraint, structure_of
from shrinkserve.server.serving.tools.formats import ToolFormat, detect_tool_format
from shrinkserve.server.serving.tools.render import render_chat as render_tool_chat
from shrinkserve.server.serving.tools.stream import (
    ContentDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    parse_tool_calls,
)
from shrinkserve.server.serving.tools.validate import ToolChoice, parse_tool_choice, parse_tools


def render_chat(tok: Tokenizer, messages: list[P._Message]) -> str:
    """Messages → prompt text through the model's own chat template (transformers' Jinja renderer)."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    if not tok.chat_template:
        raise bad_request("this profile's model has no chat template; use /v1/completions", param="messages")
    # "developer" is OpenAI's newer name for "system"; open-model templates only know the latter.
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        rendered, _ = render_jinja_template(
            [conversation], chat_template=tok.chat_template, add_generation_prompt=True,
            bos_token=tok.bos_token or "", eos_token=tok.eos_token or "",
        )
    except TemplateError as exc:
        raise bad_request(f"the chat template rejected these messages: {exc}", param="messages") from exc
    return rendered[0]


def tool_setup(req_tools: list[P.ToolDefinition] | None, tool_choice: P.ToolChoiceParam | None,
               parallel: bool | None) -> ToolChoice:
    """The request's tools and tool_choice, validated (ToolsError → 400)."""
    specs = parse_tools([t.model_dump(exclude_none=True) for t in req_tools] if req_tools is not None else None)
    raw = tool_choice.model_dump(exclude_none=True) if isinstance(tool_choice, P.Strict) else tool_choice
    return parse_tool_choice(raw, specs, parallel)


def render_prompt(tok: Tokenizer, messages: list[P._Message], choice: ToolChoice) -> str:
    """The prompt text: the plain template path unless tools or tool turns are involved."""
    if not choice.tools and not any(m.calls or m.role == "tool" for m in messages):
        return render_chat(tok, messages)
    if not tok.chat_template:
        raise bad_request("this profile's model has no chat template; use /v1/completions", param="messages")
    return render_tool_chat([m.as_openai() for m in messages], chat_template=tok.chat_template, tools=choice.tools,
                            choice=choice, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")


@dataclass
class ChatPlan:
    """What the response side needs to know about a prepared chat request."""

    tools: ToolChoice
    fmt: ToolFormat

    @property
    def parses_calls(self) -> bool:
        return self.tools.mode != "none"


def prepare(rt: ProfileRuntime, req: P.ChatCompletionRequest, t_arrival: float) -> tuple[Prepared, ChatPlan]:
    """Template, tokens, sampler parameters and the output grammar (run it in a worker thread)."""
    tok = tokenizer_of(rt)

    def build() -> tuple[Prepared, ChatPlan]:
        tools = tool_setup(req.tools, req.tool_choice, req.parallel_tool_calls)
        plan = ChatPlan(tools, detect_tool_format(tok.chat_template))
        # The template already placed any BOS text, so no special tokens are added on top.
        text = render_prompt(tok, req.messages, tools)
        ids = tok.tokenize(text, add_special=False)
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(req, max_tokens(req.max_tokens, None, len(ids), context_of(rt), "messages"), k,
                                 tok.vocab_size)
        constraint = compile_constraint(tok, structure_of(req), tools, plan.fmt)
        n = req.n or 1
        return Prepared(rt, choices([ids], params, n, constraint=constraint), [text], t_arrival, n=n), plan

    return client_errors(build)


def _tool_calls(calls: list[ToolCall]) -> list[P.ToolCall] | None:
    if not calls:
        return None
    return [P.ToolCall(id=c.id, function=P.ToolCallFunction(name=c.name, arguments=c.arguments)) for c in calls]


def response(req: P.ChatCompletionRequest, plan: ChatPlan, run: Run, outcomes: list[Outcome]
             ) -> P.ChatCompletionResponse:
    out_choices = []
    for i, out in enumerate(outcomes):
        finish = out.finish_reason
        if plan.parses_calls:
            parsed = parse_tool_calls(out.text, plan.fmt)
            message = P.AssistantMessage(content=parsed.content, tool_calls=_tool_calls(parsed.tool_calls))
            finish = parsed.finish_reason(finish) if finish is not None else None
        else:
            message = P.AssistantMessage(content=out.text)
        out_choices.append(P.ChatChoice(index=i, message=message, finish_reason=finish,
                                        logprobs=chat_logprobs(out.tokens) if req.logprobs else None))
    return P.ChatCompletionResponse(model=run.name, choices=out_choices,
                                    usage=usage(run.prepared.prompt_tokens, run.completion_tokens, run.cached_tokens))


def _delta_calls(deltas: list[ToolCallDelta]) -> list[P.ToolCallDelta]:
    return [P.ToolCallDelta(index=d.index, id=d.id, type="function" if d.id is not None else None,
                            function=P.ToolCallDeltaFunction(name=d.name, arguments=d.arguments))
            for d in deltas]


async def chunks(req: P.ChatCompletionRequest, plan: ChatPlan, run: Run) -> AsyncGenerator[str, None]:
    rid, created = P.new_id("chatcmpl"), int(time.time())
    n_choices = len(run.prepared.requests)

    def chunk(i: int, delta: P.DeltaMessage, finish: str | None = None, lp: P.ChatLogprobs | None = None) -> str:
        choice = P.ChatChunkChoice(index=i, delta=delta, logprobs=lp, finish_reason=finish)
        return sse_data(P.ChatCompletionChunk(id=rid, created=created, model=run.name, choices=[choice]))

    for i in range(n_choices):
        yield chunk(i, P.DeltaMessage(role="assistant", content=""))
    plain: dict[int, TextChunks] = {}  # per choice: the common chunk, text only
    parsers = {i: ToolCallParser(plan.fmt) for i in range(n_choices)} if plan.parses_calls else {}
    async for i, step in run.steps():
        if not step.text and not step.tokens and step.finish_reason is None:
            continue
        lp = chat_logprobs(step.tokens) if req.logprobs and step.tokens else None
        if parsers:
            parser = parsers[i]
            deltas = parser.feed(step.text)
            finish = step.finish_reason
            if finish is not None:
                deltas += parser.finish()
                finish = parser.result().finish_reason(finish)
            text = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
            calls = [d for d in deltas if isinstance(d, ToolCallDelta)]
            if text or lp is not None:
                yield chunk(i, P.DeltaMessage(content=text or None), None, lp)
            if calls:
                yield chunk(i, P.DeltaMessage(tool_calls=_delta_calls(calls)))
            if finish is not None:
                yield chunk(i, P.DeltaMessage(), finish)
            continue
        if step.text and step.finish_reason is None and lp is None:
            if i not in plain:
                plain[i] = TextChunks(P.ChatCompletionChunk(id=rid, created=created, model=run.name, choices=[
                    P.ChatChunkChoice(index=i, delta=P.DeltaMessage(content=TextChunks.placeholder()))]))
            yield plain[i](step.text)  # the common chunk: text only
            continue
        yield chunk(i, P.DeltaMessage(content=step.text or None) if step.text else P.DeltaMessage(),
                    step.finish_reason, lp)
    if req.include_usage:
        u = usage(run.prepared.prompt_tokens, run.completion_tokens, run.cached_tokens)
        yield sse_data(P.ChatCompletionChunk(id=rid, created=created, model=run.name, choices=[], usage=u))


def chat_logprobs(tokens: list[TokenInfo]) -> P.ChatLogprobs:
    content = [
        P.ChatTokenLogprob(
            token=t.text, logprob=t.logprob or 0.0, bytes=list(t.bytes),
            top_logprobs=[P.TopLogprob(token=a.text, logprob=a.logprob or 0.0, bytes=list(a.bytes))
                          for a in t.top or []],
        )
        for t in tokens
    ]
    return P.ChatLogprobs(content=content)
