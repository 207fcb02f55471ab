"""/v1/chat/completions ↔ generation requests: the model's own chat template, chat logprobs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from shrinkserve.server.api import protocol as P
from shrinkserve.server.api.errors import bad_request
from shrinkserve.server.engines.base import Tokenizer
from shrinkserve.server.runtime.registry import ProfileRuntime
from shrinkserve.server.runtime.types import GenerationRequest, TokenInfo
from shrinkserve.server.serving.base import (
    Outcome,
    Prepared,
    Run,
    context_of,
    max_tokens,
    sampling_params,
    tokenizer_of,
    usage,
)
from shrinkserve.server.serving.sse import TextChunks, sse_data


def render_chat(tok: Tokenizer, messages: list[P.ChatMessage]) -> str:
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


def prepare(rt: ProfileRuntime, req: P.ChatCompletionRequest, t_arrival: float) -> Prepared:
    tok = tokenizer_of(rt)
    # The template already placed any BOS text, so no special tokens are added on top.
    text = render_chat(tok, req.messages)
    ids = tok.tokenize(text, add_special=False)
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, max_tokens(req.max_tokens, None, len(ids), context_of(rt), "messages"), k)
    return Prepared(rt, [GenerationRequest(ids, params)], [text], t_arrival)


def response(req: P.ChatCompletionRequest, run: Run, outcomes: list[Outcome]) -> P.ChatCompletionResponse:
    (out,) = outcomes
    choice = P.ChatChoice(index=0, message=P.AssistantMessage(content=out.text),
                          logprobs=chat_logprobs(out.tokens) if req.logprobs else None,
                          finish_reason=out.finish_reason)
    return P.ChatCompletionResponse(model=run.name, choices=[choice],
                                    usage=usage(run.prepared.prompt_tokens, run.completion_tokens))


async def chunks(req: P.ChatCompletionRequest, run: Run) -> AsyncIterator[str]:
    rid, created = P.new_id("chatcmpl"), int(time.time())

    def chunk(delta: P.DeltaMessage, finish: str | None = None, lp: P.ChatLogprobs | None = None) -> str:
        choice = P.ChatChunkChoice(index=0, delta=delta, logprobs=lp, finish_reason=finish)
        return sse_data(P.ChatCompletionChunk(id=rid, created=created, model=run.name, choices=[choice]))

    yield chunk(P.DeltaMessage(role="assistant", content=""))
    plain = TextChunks(P.ChatCompletionChunk(id=rid, created=created, model=run.name, choices=[
        P.ChatChunkChoice(index=0, delta=P.DeltaMessage(content=TextChunks.placeholder()))]))
    async for _, step in run.steps():
        if not step.text and not step.tokens and step.finish_reason is None:
            continue
        if step.text and step.finish_reason is None and not req.logprobs:
            yield plain(step.text)  # the common chunk: text only
            continue
        lp = chat_logprobs(step.tokens) if req.logprobs and step.tokens else None
        yield chunk(P.DeltaMessage(content=step.text or None) if step.text else P.DeltaMessage(),
                    step.finish_reason, lp)
    if req.include_usage:
        u = usage(run.prepared.prompt_tokens, run.completion_tokens)
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
