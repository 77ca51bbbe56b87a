"""`GET /v1/loras`: the adapter catalog, all of it or the adapters one model can use. A
key limited to some models sees only the adapters those models can use."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from serve.context import ingress, model_for, usable_models

router = APIRouter()


@router.get("/v1/loras", summary="List the LoRA adapters requests may name")
async def list_loras(request: Request, model: str | None = Query(None, description=(
        "A model id or alias: only the adapters that model can use (404 if unknown)."))
                     ) -> dict:
    entries = ingress().router.catalog.entries.values()
    key = getattr(request.state, "api_key", None)
    if model is not None:
        served = model_for(request, model)
        entries = [e for e in entries if e.problem_with(served) is None]
    elif key is not None and key.models is not None:  # only what its models can use
        usable = usable_models(request)
        entries = [e for e in entries if any(e.problem_with(m) is None for m in usable)]
    data = [{"name": e.name, "base_model": e.base, "rank": e.rank,
             "default_scale": e.default_scale, "layout": e.layout} for e in entries]
    return {"object": "list", "data": data}
