"""/v1/completions ↔ generation requests: text or token prompts, echo, legacy logprobs, and the same
output constraints as chat (`response_format`, vLLM's `structured_outputs` / `guided_*`)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from shrinkserve.server.protocol import openai as P
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
    prompt_ids,
    sampling_params,
    tokenizer_of,
    usage,
)
from shrinkserve.server.serving.sse import TextChunks, sse_data
from shrinkserve.server.serving.structured import compile_constraint, structure_of


def prepare(rt: ProfileRuntime, req: P.CompletionRequest, t_arrival: float) -> Prepared:
    """Tokens, sampler parameters and the output grammar (run it in a worker thread)."""
    tok = tokenizer_of(rt)

    def build() -> Prepared:
        prompts = prompt_ids(tok, req.prompts())
        longest = max(len(p) for p in prompts)
        params = sampling_params(req, max_tokens(req.max_tokens, 16, longest, context_of(rt), "prompt"), req.logprobs,
                                 tok.vocab_size)
        prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        texts = [p if isinstance(p, str) else tok.detokenize(ids)
                 for p, ids in zip(req.prompts(), prompts, strict=True)]
        constraint = compile_constraint(tok, structure_of(req))
        n = req.n or 1
        requests = choices(prompts, params, n, constraint=constraint, prompt_logprobs=prompt_lp)
        return Prepared(rt, requests, texts, t_arrival, n=n)

    return client_errors(build)


def response(req: P.CompletionRequest, run: Run, outcomes: list[Outcome]) -> P.CompletionResponse:
    choices = []
    for i, out in enumerate(outcomes):
        text = (run.prepared.prompt_texts[run.prepared.prompt_of(i)] if req.echo else "") + out.text
        logprobs = None
        if req.logprobs is not None:
            toks = (out.prompt_logprobs or []) + out.tokens if req.echo else out.tokens
            logprobs = completion_logprobs(toks)
        choices.append(P.CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=out.finish_reason))
    return P.CompletionResponse(model=run.name, choices=choices,
                                usage=usage(run.prepared.prompt_tokens, run.completion_tokens, run.cached_tokens))


async def chunks(req: P.CompletionRequest, run: Run) -> AsyncGenerator[str, None]:
    rid, created = P.new_id("cmpl"), int(time.time())
    echoed = [False] * len(run.prepared.requests)
    plain: dict[int, TextChunks] = {}  # per choice index: the common chunk, text only
    async for i, step in run.steps():
        text = step.text
        toks = list(step.tokens)
        if req.echo and not echoed[i]:
            text = run.prepared.prompt_texts[run.prepared.prompt_of(i)] + text
            toks = (step.prompt_logprobs or []) + toks
            echoed[i] = True
        if not text and not toks and step.finish_reason is None:
            continue
        if req.logprobs is None and step.finish_reason is None:
            if i not in plain:
                choice = P.CompletionChoice(index=i, text=TextChunks.placeholder())
                plain[i] = TextChunks(P.CompletionChunk(id=rid, created=created, model=run.name, choices=[choice]))
            yield plain[i](text)
            continue
        lp = completion_logprobs(toks) if req.logprobs is not None else None
        choice = P.CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=step.finish_reason)
        yield sse_data(P.CompletionChunk(id=rid, created=created, model=run.name, choices=[choice]))
    if req.include_usage:
        u = usage(run.prepared.prompt_tokens, run.completion_tokens, run.cached_tokens)
        yield sse_data(P.CompletionChunk(id=rid, created=created, model=run.name, choices=[], usage=u))


def completion_logprobs(tokens: list[TokenInfo]) -> P.CompletionLogprobs:
    """OpenAI's legacy logprobs: the chosen token is always among `top_logprobs`, as in vLLM."""
    out = P.CompletionLogprobs()
    offset = 0
    for t in tokens:
        out.tokens.append(t.text)
        out.token_logprobs.append(t.logprob)
        if t.logprob is None:
            out.top_logprobs.append(None)
        else:
            top = {alt.text: alt.logprob for alt in t.top or [] if alt.logprob is not None}
            top.setdefault(t.text, t.logprob)
            out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(t.text)
    return out
