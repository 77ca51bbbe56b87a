"""Replicate's account-level routes: the account, the webhook signing secret
(`replicate.webhooks.default.secret()`), the cluster's hardware (serve.hardware), and
deployments, for client code written against
a Replicate deployment (`replicate.deployments.get("acme/product-shots")
.predictions.create(...)`).

A deployment here is a served model named by its id or any of its aliases: give the
model the alias `acme/product-shots` and that code runs unchanged. Its one release is
the model's current version, on the hardware its `accelerator_type` names (`gpu`: any
GPU). Deployments are made by the config, not through the API: creating, updating or
deleting one is a 405 that says so (serve.routes.replicate_managed).
"""

from __future__ import annotations

import asyncio
import time

import ray
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serve.config import ModelConfig
from serve.context import IngressState, client_name, ingress, model_for, usable_models
from serve.hardware import cluster_hardware, sku
from serve.routes.replicate import create_for_model, served_name
from serve.routes.replicate_body import PredictionBody

router = APIRouter()


def _deployment_json(state: IngressState, name: str, model: ModelConfig) -> dict:
    owner, _, short = name.partition("/")
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.started_at))
    hardware = (sku(model.accelerator_type) if model.accelerator_type else
                {"cuda": "gpu", "cpu": "cpu"}.get(model.device, "auto"))
    served = served_name(model, name)  # (an upscaling alias runs its own version)
    return {"owner": owner, "name": short, "current_release": {
        "number": 1, "model": served, "version": state.versions[served],
        "created_at": created, "created_by": None, "configuration": {
            "hardware": hardware, "min_instances": model.replica_range[0],
            "max_instances": model.replica_range[1]}}}


@router.get("/v1/deployments", summary="Replicate: list deployments (the served models)")
async def list_deployments(request: Request) -> dict:
    state = ingress()
    models = usable_models(request)
    return {"results": [_deployment_json(state, m.id, m) for m in models],
            "next": None, "previous": None}


@router.get("/v1/deployments/{owner}/{name}", summary="Replicate: get a deployment")
async def get_deployment(owner: str, name: str, request: Request) -> dict:
    state = ingress()
    model = model_for(request, f"{owner}/{name}")
    return _deployment_json(state, f"{owner}/{name}", model)


@router.post("/v1/deployments/{owner}/{name}/predictions",
             summary="Replicate: run a deployment (a model by id or alias)")
async def create_deployment_prediction(owner: str, name: str, body: PredictionBody,
                                       request: Request) -> JSONResponse:
    return await create_for_model(f"{owner}/{name}", None, body, request)


@router.get("/v1/account", summary="Replicate: the account the API key belongs to")
async def get_account(request: Request) -> dict:
    """The key's name as the account (what owns its predictions and uploads); "atelier"
    on a server without keys."""
    name = client_name(request)
    if name == "open":
        return {"type": "organization", "username": "atelier", "name": "Atelier",
                "github_url": None}
    return {"type": "organization", "username": name, "name": name, "github_url": None}


@router.get("/v1/hardware", summary="Replicate: the cluster's hardware")
async def list_hardware() -> list[dict]:
    """The alive servers' CPUs and GPUs by type (Replicate's sku and name, with `count`
    and `servers` beside them)."""
    return cluster_hardware(await asyncio.to_thread(ray.nodes))


@router.get("/v1/webhooks/default/secret", summary="Replicate: the webhook signing secret")
async def get_webhook_secret(request: Request) -> dict:
    """The secret that signs the webhooks of the request's API key."""
    return {"key": await ingress().webhook_secret(client_name(request))}
