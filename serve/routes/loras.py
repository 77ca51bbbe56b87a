"""`GET /v1/loras`: the adapter catalog."""

from __future__ import annotations

from fastapi import APIRouter

from serve.context import ingress

router = APIRouter()


@router.get("/v1/loras", summary="List the LoRA adapters requests may name")
async def list_loras() -> dict:
    entries = ingress().router.catalog.entries.values()
    data = [{"name": e.name, "base_model": e.base, "rank": e.rank,
             "default_scale": e.default_scale, "layout": e.layout} for e in entries]
    return {"object": "list", "data": data}
