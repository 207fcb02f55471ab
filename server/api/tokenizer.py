"""vLLM-style /tokenize, /detokenize and /tokenizer_info (lm-eval's remote tokenizer reads these).

Chat messages render exactly as /v1/chat/completions renders them (tools included), so a count here is
the prompt's count there. Tokenization runs in a worker thread, not on the event loop.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request

from shrinkserve.server.api.deps import label, ready_profile, run_cpu
from shrinkserve.server.api.services import Services
from shrinkserve.server.protocol import openai as P
from shrinkserve.server.protocol.errors import APIError
from shrinkserve.server.runtime.registry import ProfileRuntime
from shrinkserve.server.serving.base import client_errors, context_of, tokenizer_of
from shrinkserve.server.serving.chat import render_prompt, tool_setup


def _tokenize(rt: ProfileRuntime, req: P.TokenizeRequest) -> list[int]:
    tok = tokenizer_of(rt)
    if req.messages is not None:
        messages = req.messages

        def render() -> str:
            return render_prompt(tok, messages, tool_setup(req.tools, None, None))

        return tok.tokenize(client_errors(render), add_special=False)
    return tok.tokenize(req.prompt or "", add_special=req.add_special_tokens)


def router(svc: Services, forced: str | None) -> APIRouter:
    r = APIRouter()

    async def profile(http: Request, model: str | None) -> ProfileRuntime:
        # A tokenizer client (lm-eval's remote tokenizer) may name no model: the route's profile, else the first.
        default = None if forced else next(iter(svc.registry.profiles))
        label(http, forced, model or default)
        return await ready_profile(svc.registry, forced, model or default)

    @r.get("/tokenizer_info")
    async def tokenizer_info(http: Request, model: str | None = None) -> P.TokenizerInfo:
        """What vLLM's /tokenizer_info gives: lm-eval's remote tokenizer reads the special tokens here."""
        rt = await profile(http, model)
        tok = tokenizer_of(rt)
        return P.TokenizerInfo(tokenizer_class=f"shrinkserve-{tok.name}", eos_token=tok.eos_token,
                               bos_token=tok.bos_token, pad_token=None, chat_template=tok.chat_template,
                               model_max_length=context_of(rt))

    @r.post("/tokenize")
    async def tokenize(req: P.TokenizeRequest, http: Request) -> P.TokenizeResponse:
        rt = await profile(http, req.model)
        ids = await run_cpu(_tokenize, rt, req)
        return P.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=context_of(rt))

    @r.post("/detokenize")
    async def detokenize(req: P.DetokenizeRequest, http: Request) -> P.DetokenizeResponse:
        rt = await profile(http, req.model)
        tok = tokenizer_of(rt)
        bad = [t for t in req.tokens if not 0 <= t < tok.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {tok.vocab_size})", param="tokens")
        return P.DetokenizeResponse(prompt=await run_cpu(tok.detokenize, req.tokens))

    return r


def attach_router(app: FastAPI, svc: Services) -> None:
    app.include_router(router(svc, None))
    for prefix, profile in svc.settings.routes.items():
        app.include_router(router(svc, profile), prefix=prefix)
