"""GET /health (the process lives), /ready (every eager profile settled and not draining), /metrics."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shrinkserve.server.api.services import Services


def attach_router(app: FastAPI, svc: Services) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"description": "not ready: some eager profile is not settled, or the "
                                                      "server is draining (same body)"}})
    async def ready() -> JSONResponse:
        states = {}
        for n, rt in svc.registry.profiles.items():
            failures = rt.gate_failures
            states[n] = {"state": rt.state, "load": rt.spec.load, **({"error": rt.error} if rt.error else {}),
                         **({"gate_failures": failures} if failures else {})}
        serving = svc.lifecycle.phase == "serving"
        ok = serving and svc.registry.ready
        body = {"ready": ok, "profiles": states, **({} if serving else {"phase": svc.lifecycle.phase})}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
