"""Replicate's predictions API, for the official `replicate` client.

Inputs mirror `stability-ai/sdxl` for SDXL models, `black-forest-labs/flux-dev` for
FLUX models, and `black-forest-labs/flux-kontext-dev`, `flux-fill-dev`, `flux-canny-dev`
and `flux-depth-dev` for Kontext, Fill, Canny and Depth models (each version's schema says
which).
`apply_watermark: false` leaves out the invisible watermark, where the model's config lets
it; `go_fast` is accepted and has no effect (speed is the model's config);
`disable_safety_checker` skips the model's safety checker, where it has one that lets it.
As on Replicate, flagged images are left out of the output, and a prediction whose images
were all flagged fails with "NSFW content detected...". Output is a list of file URLs
served under /files for `file_ttl_s` (for Kontext models, as for flux-kontext-dev, one
URL). As on Replicate, a create call with `Prefer: wait` that finishes in time answers
with the files inline as data URIs (the official clients turn either form into file
objects); the stored prediction keeps the URLs.
"""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serve.config import ModelConfig
from serve.context import (
    IngressState,
    base_url,
    charge_images,
    client_name,
    ingress,
    model_for,
    request_id,
    requester,
    sees,
    sees_all,
    usable_models,
)
from serve.errors import AtelierError, InvalidField, ModelNotFound
from serve.prediction_events import prediction_events
from serve.predictions import Prediction, owner_of
from serve.routes.replicate_body import PredictionBody, duration_s, wait_seconds
from serve.routes.replicate_runs import to_request
from serve.routes.replicate_schemas import input_schema, parse_input, single_output
from serve.webhooks import check_events, check_webhook

router = APIRouter()


class PredictionNotFound(AtelierError):
    status = 404
    kind = "prediction_not_found"


def runs_at(state: IngressState, model: ModelConfig, name: str, version: str) -> bool:
    """Whether `version` runs the model as `name` (served_name): the version served, or
    a Replicate version the config pins to it (replicate_versions)."""
    pinned = model.pinned_versions.get(version)
    return version == state.versions[name] or (
        pinned is not None and served_name(model, pinned) == name)


def served_name(model: ModelConfig, name: str) -> str:
    """The name a prediction of `model` asked for as `name` is kept under, with its own
    version and inputs: an upscaling alias (real-esrgan's), else the model's id."""
    return name if name in model.upscaling_aliases else model.id


def model_json(state: IngressState, name: str, base: str) -> dict:
    """A served model as Replicate's API shows one named `name` (its id or an alias; under
    an upscaling alias, as that upscaler), with its latest version."""
    model = state.router.resolve(name)
    shown = served_name(model, name)
    owner, short = shown.split("/")
    return {"url": f"{base}/v1/models/{shown}", "owner": owner, "name": short,
            "description": description(model, shown), "visibility": "public",
            "github_url": None, "paper_url": None, "license_url": None, "run_count": 0,
            "cover_image_url": None, "default_example": None,
            "latest_version": _version_json(state, name)}


def description(model: ModelConfig, shown: str) -> str:
    """What Replicate's API says the model is, shown as `shown` (its id, or an upscaling
    alias)."""
    what = "image upscaling" if shown != model.id else model.family
    return f"{what} served by Atelier"


def _version_json(state: IngressState, name: str) -> dict:
    """The version served of the model named `name`, with its inputs under that name."""
    model = state.router.resolve(name)
    output = {"type": "string", "format": "uri", "title": "Output"}
    if not single_output(model, name):
        output = {"type": "array", "items": output, "title": "Output"}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.started_at))
    title = served_name(model, name)
    return {"id": state.versions[title], "created_at": created,
            "cog_version": "atelier", "openapi_schema": {
                "openapi": "3.0.2", "info": {"title": title, "version": "1"},
                "components": {"schemas": {"Input": input_schema(model, name),
                                           "Output": output}}}}


@router.get("/v1/models/{owner}/{name}", summary="Replicate (and OpenAI): get a model")
async def get_model(owner: str, name: str, request: Request) -> dict:
    """Replicate's model, with the fields OpenAI's `models.retrieve` reads beside them."""
    state = ingress()
    model_for(request, f"{owner}/{name}")  # (404 for a model the key may not use)
    found = model_json(state, f"{owner}/{name}", base_url(request))
    return {**found, "id": f"{found['owner']}/{found['name']}", "object": "model",
            "created": state.started_at, "owned_by": found["owner"]}


@router.get("/v1/models/{owner}/{name}/versions", summary="Replicate: list a model's versions")
async def list_versions(owner: str, name: str, request: Request) -> dict:
    """The version served: a model's version follows its files, and one is served at once."""
    state = ingress()
    model_for(request, f"{owner}/{name}")
    return {"next": None, "previous": None, "results": [_version_json(state, f"{owner}/{name}")]}


@router.get("/v1/models/{owner}/{name}/versions/{version}", summary="Replicate: get a version")
async def get_version(owner: str, name: str, version: str, request: Request) -> dict:
    state = ingress()
    model = model_for(request, f"{owner}/{name}")
    if not runs_at(state, model, served_name(model, f"{owner}/{name}"), version):
        raise ModelNotFound(f"{owner}/{name}:{version}", list(state.versions))
    return _version_json(state, f"{owner}/{name}") | {"id": version}  # (a pinned one's too)


@router.post("/v1/models/{owner}/{name}/predictions", summary="Replicate: run a model")
async def create_model_prediction(owner: str, name: str, body: PredictionBody,
                                  request: Request) -> JSONResponse:
    return await create_for_model(f"{owner}/{name}", None, body, request)


@router.post("/v1/predictions", summary="Replicate: run a model version")
async def create_prediction(body: PredictionBody, request: Request) -> JSONResponse:
    if not body.version:
        raise InvalidField("version", "give a model as owner/name[:version] or a version id")
    ref, _, version = body.version.partition(":")
    state = ingress()
    if "/" not in ref:  # a bare version id: served, or pinned in the config
        owners = [m for m, v in state.versions.items() if v == ref] + [
            m.pinned_versions[ref] for m in state.router.config.models
            if ref in m.pinned_versions]
        if not owners:
            raise ModelNotFound(ref, [m.id for m in usable_models(request)])
        ref, version = owners[0], ref
    return await create_for_model(ref, version or None, body, request)


async def create_for_model(model_ref: str, version: str | None, body: PredictionBody,
                           request: Request) -> JSONResponse:
    """Accept a prediction of `model_ref` (an id or alias), at `version` if given."""
    state = ingress()
    model = model_for(request, model_ref)
    name = served_name(model, model_ref)  # the model's id, or an upscaling alias
    if version is not None and not runs_at(state, model, name, version):
        raise InvalidField("version", f"{name} is served at version {state.versions[name]}")
    rid = request_id(request)
    inp = parse_input(model, body.input, name)
    who = requester(request)
    key = getattr(request.state, "api_key", None)
    # Before its input images are fetched and decoded, which a refused request need not.
    async with state.predictions.room(owner_of(who), key and key.max_unfinished_predictions,
                                      state.router.config.max_unfinished_predictions) as pid:
        gen = await to_request(state, model.id, inp, rid, **who)  # refuses bad input first
        if body.webhook:
            check_webhook(body.webhook, state.router.config.webhook_allowed_hosts)
        deadline_s = duration_s(request.headers.get("cancel-after"))
        await charge_images(request, gen.num_outputs)
        prediction = Prediction(
            id=pid, model=name, version=state.versions[name],
            input=inp.model_dump(exclude_unset=True, exclude_none=True), private={
                "seed": gen.seed, "base": base_url(request), "request_id": rid, **who,
                "webhook": body.webhook,
                "events": list(check_events(body.webhook_events_filter)),
                "cancel_at": None if deadline_s is None else time.time() + deadline_s})
        state.prepared[pid] = gen  # its input images are decoded (and fetched) once
        try:
            await state.predictions.start(prediction)
        except BaseException:
            state.prepared.pop(pid, None)
            raise
    base = base_url(request)
    wait_s = wait_seconds(request.headers.get("prefer", ""))
    if wait_s:
        await state.predictions.wait(prediction.id, wait_s)
    payload = prediction.to_json(base)
    if wait_s and not prediction.done:
        payload["status"] = "starting"  # as Replicate does when the wait runs out
    if wait_s and prediction.status == "succeeded":
        output = prediction.output
        payload["output"] = (await _data_uri(state, output) if isinstance(output, str) else
                             [await _data_uri(state, url) for url in output])
    return JSONResponse(payload, status_code=201 if prediction.done or not wait_s else 202)


async def _data_uri(state: IngressState, url: str) -> str:
    """The file behind one of our output URLs, inline; the URL if it is already gone."""
    stored = await state.store.get_file(url.rsplit("/", 1)[-1])
    if stored is None:
        return url
    return f"data:{stored.media_type};base64,{base64.b64encode(stored.data).decode()}"


def _visible(request: Request, prediction: Prediction) -> bool:
    return sees(request, prediction.owner)


async def _own_prediction(request: Request, prediction_id: str) -> Prediction:
    prediction = await ingress().store.load(prediction_id)
    if prediction is None or not _visible(request, prediction):
        raise PredictionNotFound(f"no prediction {prediction_id!r}")
    return prediction


@router.get("/v1/predictions/{prediction_id}", summary="Replicate: get a prediction")
async def get_prediction(prediction_id: str, request: Request) -> dict:
    return (await _own_prediction(request, prediction_id)).to_json(base_url(request))


@router.get("/v1/predictions/{prediction_id}/stream",
            summary="Replicate: a prediction's logs, output and end as server-sent events")
async def stream_prediction(prediction_id: str, request: Request) -> StreamingResponse:
    """`urls.stream`: new log lines (`logs`), each output file's URL (`output`), the error
    (`error`) and the end (`done`), following the stored prediction whichever ingress
    replica runs it."""
    prediction, store = await _own_prediction(request, prediction_id), ingress().store
    return StreamingResponse(prediction_events(prediction, lambda: store.load(prediction_id)),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


@router.post("/v1/predictions/{prediction_id}/cancel", summary="Replicate: cancel")
async def cancel_prediction(prediction_id: str, request: Request) -> dict:
    prediction = await _own_prediction(request, prediction_id)
    await ingress().predictions.cancel(prediction)
    return prediction.to_json(base_url(request))


_PAGE = 100


@router.get("/v1/predictions", summary="Replicate: list predictions, newest first")
async def list_predictions(request: Request, cursor: str | None = None) -> dict:
    """The key's own predictions (from the store's index of them, so a key's listing never
    reads other keys'), newest first, `_PAGE` at a time."""
    owner = None if sees_all(request) else client_name(request)
    page, after = await ingress().store.page(cursor, _PAGE, owner)
    base = base_url(request)
    return {"results": [p.to_json(base) for p in page], "previous": None,
            "next": f"{base}/v1/predictions?cursor={after}" if after else None}
