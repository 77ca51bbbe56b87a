"""Replicate's collections (`replicate.collections.list()`, `.get(slug)`): the served
models grouped by what they do, as Replicate groups its own (`text-to-image`,
`super-resolution`, ...). A collection is listed when it holds one of the models the
request's API key may use; a model's upscaling aliases are in `super-resolution`, as the
upscalers they run as (Replicate's model JSON under that name, as `models.get` gives it).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from serve.config import ModelConfig
from serve.context import base_url, ingress, usable_models
from serve.errors import AtelierError
from serve.routes.replicate import model_json

router = APIRouter()

COLLECTIONS = {  # slug: (name, description)
    "text-to-image": ("Text to image", "Models that draw an image from a prompt."),
    "image-editing": ("Image editing", ("Models made to redraw a picture, or the part a "
                      "mask shows, from a prompt: FLUX.1 Kontext and Fill, SDXL inpainting.")),
    "control-net": ("Control", ("Models steered by an edge, depth or pose map of a picture: "
                    "SDXL with ControlNets, FLUX.1 Canny and Depth.")),
    "super-resolution": ("Upscalers", "Models that enlarge images."),
    "sdxl": ("SDXL", "Stable Diffusion XL models."),
    "flux": ("FLUX", "FLUX.1 models."),
}


class CollectionNotFound(AtelierError):
    status = 404
    kind = "collection_not_found"


def _members(model: ModelConfig, slug: str) -> list[str]:
    """The names `model` is in collection `slug` under (none, its id, or its upscalers)."""
    if slug == "super-resolution":
        return list(model.upscaling_aliases)
    member = {"text-to-image": model.flux_kind is None and not model.inpainting,
              "image-editing": model.flux_kind in ("kontext", "fill") or model.inpainting,
              "control-net": bool(model.controlnets) or model.flux_kind in ("canny", "depth"),
              "sdxl": model.family == "sdxl", "flux": model.family == "flux"}[slug]
    return [model.id] if member else []


def _names(request: Request, slug: str) -> list[str]:
    return [name for model in usable_models(request) for name in _members(model, slug)]


def _collection_json(slug: str) -> dict:
    name, about = COLLECTIONS[slug]
    return {"slug": slug, "name": name, "description": about}


@router.get("/v1/collections", summary="Replicate: list the collections of served models")
async def list_collections(request: Request) -> dict:
    return {"results": [_collection_json(slug) for slug in COLLECTIONS
                        if _names(request, slug)], "next": None, "previous": None}


@router.get("/v1/collections/{slug}", summary="Replicate: a collection, with its models")
async def get_collection(slug: str, request: Request) -> dict:
    names = _names(request, slug) if slug in COLLECTIONS else []
    if not names:
        raise CollectionNotFound(f"no collection {slug!r} among the served models; "
                                 f"GET /v1/collections lists them")
    state, base = ingress(), base_url(request)
    return _collection_json(slug) | {"models": [model_json(state, n, base) for n in names]}
