"""`GET /v1/models` (OpenAI's list shape, with Replicate's beside it) and `GET /healthz`."""

from __future__ import annotations

import asyncio
from typing import get_args

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serve.context import base_url, ingress, model_for, usable_models
from serve.model_extras import BICUBIC
from serve.replicas import model_deployments
from serve.routes.replicate import description, model_json
from serve.types import MOST_PROMPT_PICTURES, IPAdapterBlocks

router = APIRouter()
# Deployment states in which a model serves (an autoscaled one while it adds or removes
# replicas too).
_SERVING = ("HEALTHY", "UPSCALING", "DOWNSCALING")


@router.get("/v1/models", summary="List served models")
async def list_models(request: Request) -> dict:
    """OpenAI's client reads `data`, Replicate's (`models.list()`) reads `results`: there,
    a model's upscaling aliases follow it, as the upscalers they run as."""
    state = ingress()
    models = usable_models(request)  # those the request's key may use
    created = state.started_at
    data = [{"id": m.id, "object": "model", "created": created, "owned_by": m.id.split("/")[0],
             "family": m.family, "kontext": m.kontext, "fill": m.fill, "canny": m.canny,
             "depth": m.depth, "inpainting": m.inpainting,
             "aliases": m.aliases, "upscaling_aliases": m.upscaling_aliases,
             "controlnets": {name: {"conditioning_scale": net.conditioning_scale,
                                    "preprocess": net.preprocess,
                                    "control_mode": net.control_mode}
                             for name, net in m.controlnets.items()},
             "ip_adapter": m.ip_adapter and {
                 "scale": m.ip_adapter.scale,
                 "extra": {name: {"scale": e.scale} for name, e in m.ip_adapter.extra.items()},
                 # A mood board's most pictures; whether masks and blocks are taken (SDXL).
                 "pictures": MOST_PROMPT_PICTURES, "masks": m.family == "sdxl",
                 "blocks": list(get_args(IPAdapterBlocks)) if m.family == "sdxl" else ["all"]},
             "redux": m.redux and {"downsampling": m.redux.downsampling,
                                   "pictures": MOST_PROMPT_PICTURES},
             "textual_inversions": [e.token for e in m.textual_inversions],
             "prompts": m.prompts.model_dump() if m.family == "sdxl" else None,
             "styles": {name: s.model_dump() for name, s in m.styles.items()},
             "options": m.options(),
             # The hires pass's upscalers, its default first (none: no hires pass).
             "upscalers": [*m.upscalers, BICUBIC] if m.options()["upscale"] else [],
             "schedulers": list(m.rules.schedulers),
             "limits": m.limits.model_dump(),
             "defaults": m.defaults.model_dump() | {"scheduler": m.default_scheduler}}
            for m in models]
    base = base_url(request)
    return {"object": "list", "data": data, "next": None, "previous": None,
            "results": [model_json(state, name, base)
                        for m in models for name in (m.id, *m.upscaling_aliases)]}


@router.api_route("/v1/models", methods=["QUERY"], summary="Replicate: search the served models")
async def search_models(request: Request) -> dict:
    """Replicate's `models.search`: the body is the query's text; the served models (and
    upscaling aliases, as the upscalers they run as) whose names, kind and description
    hold each of its words, in list_models' order and shape."""
    words = (await request.body()).decode(errors="replace").lower().split()
    state, base = ingress(), base_url(request)
    found = []
    for m in usable_models(request):
        for name in (m.id, *m.upscaling_aliases):
            about = [name, description(m, name)]
            if name == m.id:
                about += [*m.aliases, m.flux_kind or "", "inpainting" if m.inpainting else ""]
            if all(word in " ".join(about).lower() for word in words):
                found.append(model_json(state, name, base))  # (its schema: matches only)
    return {"results": found, "next": None, "previous": None}


@router.get("/v1/models/{name}", summary="OpenAI: get a model by a bare alias")
async def get_aliased_model(name: str, request: Request) -> dict:
    """OpenAI's `models.retrieve` of a name without an owner, an alias such as dall-e-3:
    the model object under that name, with the served model it stands for."""
    model = model_for(request, name)  # (404 for a name not served, or not to this key)
    return {"id": name, "object": "model", "created": ingress().started_at,
            "owned_by": model.id.split("/")[0], "model": model.id}


@router.get("/healthz", summary="Readiness of every model deployment")
async def healthz() -> JSONResponse:
    """200 only when every model deployment is healthy (or scaling, autoscaled) with a
    replica running; a model that is not says why, in Serve's words. `store` says
    whether the prediction and file store answers (serve.store_health: not a reason for
    503, as inline images need no store)."""
    deployments = await asyncio.to_thread(model_deployments, ingress().deployment_names)
    models, ready = {}, True
    for model in ingress().router.config.models:
        dep = deployments[model.id]
        replicas = dep.running if dep else 0
        healthy = dep is not None and dep.status in _SERVING and replicas > 0
        ready &= healthy
        models[model.id] = {"state": "ready" if healthy else "not_ready",
                            "status": dep.status if dep else "MISSING",
                            "replicas_running": replicas,
                            "replicas_wanted": model.replica_range[0],
                            "replicas_range": list(model.replica_range)}
        if not healthy:  # Serve's word on why (e.g. replicas no server has room for)
            models[model.id]["message"] = dep.message if dep else "no such deployment"
    return JSONResponse({"status": "ok" if ready else "unavailable", "models": models,
                         "store": ingress().store_health.as_json()},
                        status_code=200 if ready else 503)
