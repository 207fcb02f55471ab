"""vLLM-style /tokenize, /detokenize and /tokenizer_info (lm-eval's remote tokenizer reads these)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI

from shrinkserve.server.api import protocol as P
from shrinkserve.server.api.deps import auth, ready_profile
from shrinkserve.server.api.errors import APIError
from shrinkserve.server.api.services import Services
from shrinkserve.server.runtime.registry import ProfileRuntime
from shrinkserve.server.serving.base import context_of, tokenizer_of
from shrinkserve.server.serving.chat import render_chat


def router(svc: Services, forced: str | None) -> APIRouter:
    r = APIRouter(dependencies=[Depends(auth(svc.settings))])

    async def profile(model: str | None) -> ProfileRuntime:
        # A tokenizer client (lm-eval's remote tokenizer) may name no model: the route's profile, else the first.
        default = None if forced else next(iter(svc.registry.profiles))
        return await ready_profile(svc.registry, forced, model or default)

    @r.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None) -> dict[str, Any]:
        """What vLLM's /tokenizer_info gives: lm-eval's remote tokenizer reads the special tokens here."""
        rt = await profile(model)
        tok = tokenizer_of(rt)
        return {"tokenizer_class": f"shrinkserve-{tok.name}", "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": None, "chat_template": tok.chat_template, "model_max_length": context_of(rt)}

    @r.post("/tokenize")
    async def tokenize(req: P.TokenizeRequest) -> dict[str, Any]:
        rt = await profile(req.model)
        tok = tokenizer_of(rt)
        if req.messages is not None:
            ids = tok.tokenize(render_chat(tok, req.messages), add_special=False)
        else:
            ids = tok.tokenize(req.prompt or "", add_special=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": context_of(rt)}

    @r.post("/detokenize")
    async def detokenize(req: P.DetokenizeRequest) -> dict[str, Any]:
        tok = tokenizer_of(await profile(req.model))
        bad = [t for t in req.tokens if not 0 <= t < tok.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range", param="tokens")
        return {"prompt": tok.detokenize(req.tokens)}

    return r


def attach_router(app: FastAPI, svc: Services) -> None:
    app.include_router(router(svc, None))
    for prefix, profile in svc.settings.routes.items():
        app.include_router(router(svc, profile), prefix=prefix)
