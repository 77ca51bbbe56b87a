"""Access to the running ingress replica from route functions.

Serve copies the FastAPI app into each replica, so per-replica state lives on the ingress
object itself, reached through Serve's replica context.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import httpx
from fastapi import Request
from ray import serve
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException

from serve.auth import ApiKey
from serve.config import ModelConfig
from serve.errors import InvalidField
from serve.images import ImageFetcher
from serve.metrics import IngressMetrics
from serve.predictions import PredictionRunner, StateStore
from serve.rate_limits import draw
from serve.router import ModelRouter
from serve.types import GenerationRequest


class IngressState(Protocol):
    router: ModelRouter
    deployment_names: dict[str, str]
    started_at: int
    store: StateStore
    api_keys: tuple[ApiKey, ...]
    predictions: PredictionRunner
    versions: dict[str, str]
    http_client: httpx.AsyncClient
    images: ImageFetcher
    replica: str
    metrics: IngressMetrics
    prepared: dict[str, GenerationRequest]  # accepted predictions' requests, until they run

    async def webhook_secret(self, owner: str) -> str: ...


def ingress() -> IngressState:
    return serve.get_replica_context().servable_object


def model_for(request: Request, name: str | None) -> ModelConfig:
    """The served model `name` (None: the default) as the request's API key may use it;
    raises ModelNotFound otherwise."""
    return ingress().router.resolve(name, getattr(request.state, "api_key", None))


def usable_models(request: Request) -> list[ModelConfig]:
    """The served models the request's API key may use, in config order."""
    return ingress().router.usable(getattr(request.state, "api_key", None))


def request_id(request: Request) -> str:
    """The id Serve echoes in the X-Request-Id response header (the client's, if sent),
    which Serve's structured logs carry on every line about this request."""
    from ray.serve.context import _get_serve_request_context  # no public accessor

    return (_get_serve_request_context().request_id or request.headers.get("x-request-id")
            or uuid.uuid4().hex)


def client_name(request: Request) -> str:
    """The name of the API key the request came with ("open" on a server without keys),
    as the ingress middleware recorded it: usage is counted by it."""
    return getattr(request.state, "client", "open")


def sees_all(request: Request) -> bool:
    """Whether the request's API key sees what every key made: with `sees_all_predictions`,
    or on a server without keys."""
    key = getattr(request.state, "api_key", None)
    return client_name(request) == "open" or (key is not None and key.sees_all_predictions)


def sees(request: Request, owner: str | None) -> bool:
    """Whether the request's API key may see what the key named `owner` made (a prediction,
    an upload): its own (by the key's name, as Replicate shows an account its own), or
    every one where `sees_all`."""
    return owner == client_name(request) or sees_all(request)


def requester(request: Request) -> dict:
    """What a generation request takes from its API key: its name (usage is counted by
    it) and its priority."""
    key = getattr(request.state, "api_key", None)
    return {"client": client_name(request), "priority": key.priority if key else 0}


async def charge_images(request: Request, images: int) -> None:
    """Take a generation request's images from its key's images-per-minute bucket, before
    any work is queued; RateLimited (429 with Retry-After) when the bucket is short."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    if key is None or key.images_per_minute is None:
        return
    state = ingress()
    drawn = await draw(state.store, key, "images", images)
    if not drawn.allowed:
        state.metrics.rate_limited.inc(1, {"key": key.name})
        raise drawn.refusal(key.name)


def base_url(request: Request) -> str:
    """The URL clients reached this server at, for the links in answers (no trailing /)."""
    return str(request.base_url).rstrip("/")


@asynccontextmanager
async def multipart_form(request: Request, field: str, max_files: int,
                         max_fields: int) -> AsyncIterator[FormData]:
    """The request's multipart form, its files closed on leaving (Starlette spools large
    ones to temporary files, which would otherwise stay open until collected). Malformed
    data, or more files or fields than allowed: InvalidField on `field`."""
    try:
        form = await request.form(max_files=max_files, max_fields=max_fields)
    except HTTPException as exc:
        raise InvalidField(field, f"not a valid multipart/form-data body: {exc.detail}",
                           ) from None
    try:
        yield form
    finally:
        await form.close()
