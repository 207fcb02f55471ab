"""The FastAPI application: OpenAI endpoints under /v1 and under each route prefix, health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shrinkserve.server import protocol as P
from shrinkserve.server.chat import render_chat
from shrinkserve.server.errors import APIError, install_handlers
from shrinkserve.server.handlers import Server
from shrinkserve.server.metrics import Metrics
from shrinkserve.server.registry import ProfileRuntime, Registry
from shrinkserve.server.settings import Settings
from shrinkserve.server.traffic_log import TrafficLog

log = logging.getLogger("shrinkserve.app")


def _auth(settings: Settings) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip()
        if token not in settings.api_keys:
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")

    return check


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    registry = Registry(settings, metrics)
    server = Server(registry, metrics, TrafficLog(settings.capture))
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        registry.start(asyncio.get_running_loop())
        yield
        registry.close()

    app = FastAPI(title="shrinkserve", version="0.1.0", lifespan=lifespan)
    app.state.registry = registry
    app.state.metrics = metrics
    install_handlers(app)

    async def counted(profile_hint: str | None, call: Callable[[], Awaitable[Any]]) -> Any:
        """Count the request by profile and status code, whatever happens."""
        label = profile_hint if profile_hint in registry.profiles else "none"
        try:
            result = await call()
        except APIError as exc:
            metrics.requests.labels(label, str(exc.status)).inc()
            raise
        except Exception:
            metrics.requests.labels(label, "500").inc()
            raise
        metrics.requests.labels(label, "200").inc()
        return result

    def openai_router(forced: str | None) -> APIRouter:
        router = APIRouter(dependencies=[Depends(_auth(settings))])

        @router.get("/v1/models")
        async def list_models() -> P.ModelList:
            names = [forced] if forced else list(registry.profiles)
            return P.ModelList(data=[model_card(n) for n in names])

        @router.get("/v1/models/{model_id:path}")
        async def get_model(model_id: str) -> P.ModelCard:
            name = forced or model_id
            registry.get(name)
            return model_card(name)

        @router.post("/v1/completions", response_model=None)
        async def completions(req: P.CompletionRequest, http: Request) -> Any:
            return await counted(forced or req.model, lambda: server.completions(req, http, forced))

        @router.post("/v1/chat/completions", response_model=None)
        async def chat(req: P.ChatCompletionRequest, http: Request) -> Any:
            return await counted(forced or req.model, lambda: server.chat(req, http, forced))

        def tokenizer_profile(model: str | None) -> str | None:
            # A tokenizer client (lm-eval's remote tokenizer) may name no model: the first profile answers.
            return model or (None if forced else next(iter(registry.profiles)))

        @router.get("/tokenizer_info")
        async def tokenizer_info(model: str | None = None) -> dict[str, Any]:
            """What vLLM's /tokenizer_info gives: lm-eval's remote tokenizer reads the special tokens here."""
            rt = await server.profile(forced, tokenizer_profile(model))
            assert rt.engine is not None
            return {"tokenizer_class": f"shrinkserve-{rt.engine.name}", "eos_token": rt.engine.eos_token,
                    "bos_token": rt.engine.bos_token, "pad_token": None, "chat_template": rt.engine.chat_template,
                    "model_max_length": rt.engine.context_length}

        @router.post("/tokenize")
        async def tokenize(req: P.TokenizeRequest) -> dict[str, Any]:
            rt = await server.profile(forced, tokenizer_profile(req.model))
            assert rt.engine is not None
            if req.messages is not None:
                ids = rt.engine.tokenize(render_chat(rt.engine, req.messages), add_special=False)
            else:
                ids = rt.engine.tokenize(req.prompt or "", add_special=req.add_special_tokens)
            return {"tokens": ids, "count": len(ids), "max_model_len": rt.engine.context_length}

        @router.post("/detokenize")
        async def detokenize(req: P.DetokenizeRequest) -> dict[str, Any]:
            rt = await server.profile(forced, tokenizer_profile(req.model))
            assert rt.engine is not None
            bad = [t for t in req.tokens if not 0 <= t < rt.engine.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is out of range", param="tokens")
            return {"prompt": rt.engine.detokenize(req.tokens)}

        return router

    def model_card(name: str) -> P.ModelCard:
        rt = registry.profiles[name]
        built = rt.built
        ctx = rt.engine.context_length if rt.engine is not None else None
        return P.ModelCard(
            id=name, created=started, root=rt.spec.base or "", method=rt.spec.method, engine=rt.spec.engine or "",
            state=rt.state, error=rt.error, bytes_on_disk=built.bytes if built else None,
            resident_memory_bytes=rt.resident_bytes, context_length=ctx, max_model_len=ctx, routes=rt.routes,
            quality=rt.quality, gate=gate_status(rt),
        )

    def gate_status(rt: ProfileRuntime) -> P.GateStatus | None:
        if rt.spec.gate is None:
            return None
        limits = rt.spec.gate.model_dump(exclude_none=True)
        if rt.quality is None:
            return P.GateStatus(limits=limits)
        failures = rt.gate_failures
        return P.GateStatus(limits=limits, passed=not failures, failures=failures,
                            served_anyway=bool(failures) and rt.state != "rejected")

    app.include_router(openai_router(None))
    for prefix, profile in settings.routes.items():
        app.include_router(openai_router(profile), prefix=prefix)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        states = {}
        for n, rt in registry.profiles.items():
            failures = rt.gate_failures
            states[n] = {"state": rt.state, "load": rt.spec.load, **({"error": rt.error} if rt.error else {}),
                         **({"gate_failures": failures} if failures else {})}
        ok = registry.ready
        return JSONResponse({"ready": ok, "profiles": states}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
