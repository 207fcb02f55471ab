"""GET /v1/models and /v1/models/{id}: one card per profile (state, sizes, memory, quality, gate)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request

from shrinkserve.server.api.deps import label, profile_runtime
from shrinkserve.server.api.services import Services
from shrinkserve.server.protocol import openai as P
from shrinkserve.server.runtime.registry import ProfileRuntime


def model_card(svc: Services, rt: ProfileRuntime) -> P.ModelCard:
    built = rt.built
    ctx = rt.core.context_length if rt.core is not None else None
    return P.ModelCard(
        id=rt.name, created=svc.started, root=rt.spec.base or "", method=rt.spec.method, engine=rt.spec.engine or "",
        state=rt.state, error=rt.error, bytes_on_disk=built.bytes if built else None,
        resident_memory_bytes=rt.resident_bytes, context_length=ctx, max_model_len=ctx, routes=rt.routes,
        quality=rt.quality, quality_status=svc.registry.quality_status(rt), gate=gate_status(rt),
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


def router(svc: Services, forced: str | None) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models")
    async def list_models(http: Request) -> P.ModelList:
        label(http, forced, None)
        names = [forced] if forced else list(svc.registry.profiles)
        return P.ModelList(data=[model_card(svc, svc.registry.profiles[n]) for n in names])

    @r.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, http: Request) -> P.ModelCard:
        label(http, forced, model_id)
        return model_card(svc, profile_runtime(svc.registry, forced or model_id))

    return r


def attach_router(app: FastAPI, svc: Services) -> None:
    app.include_router(router(svc, None))
    for prefix, profile in svc.settings.routes.items():
        app.include_router(router(svc, profile), prefix=prefix)
