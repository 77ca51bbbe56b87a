"""Replicate's predictions API, for the official `replicate` client.

Inputs mirror `stability-ai/sdxl`. `apply_watermark` and `disable_safety_checker` are
accepted and have no effect (no watermark is added, no safety checker runs). Output is a
list of file URLs served under /files for `file_ttl_s`. As on Replicate, a create call with
`Prefer: wait` that finishes in time answers with the files inline as data URIs (the
official clients turn either form into file objects); the stored prediction keeps the URLs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serve.context import IngressState, ingress, request_id
from serve.errors import AtelierError, InvalidField, ModelNotFound, Overloaded, ReplicaLost
from serve.predictions import Prediction, now_iso
from serve.routes.replicate_inputs import PredictionBody, SDXLInput, duration_s, wait_seconds
from serve.types import GenerationRequest, GenerationResult
from serve.webhooks import WebhookSender, check_events, check_webhook

log = logging.getLogger("ray.serve.atelier.replicate")
router = APIRouter()
_SAVE_EVERY_S = 0.25
_FIRST_RETRY_S, _MAX_RETRY_S = 0.5, 10.0


class PredictionNotFound(AtelierError):
    status = 404
    kind = "prediction_not_found"


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _model_json(state: IngressState, model_id: str, base: str) -> dict:
    model = state.router.resolve(model_id)
    owner, name = model.id.split("/")
    return {"url": f"{base}/v1/models/{model.id}", "owner": owner, "name": name,
            "description": f"{model.family} served by Atelier", "visibility": "public",
            "github_url": None, "paper_url": None, "license_url": None, "run_count": 0,
            "cover_image_url": None, "default_example": None,
            "latest_version": _version_json(state, model.id)}


def _version_json(state: IngressState, model_id: str) -> dict:
    output = {"type": "array", "items": {"type": "string", "format": "uri"}, "title": "Output"}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.started_at))
    return {"id": state.versions[model_id], "created_at": created,
            "cog_version": "atelier", "openapi_schema": {
                "openapi": "3.0.2", "info": {"title": model_id, "version": "1"},
                "components": {"schemas": {"Input": SDXLInput.model_json_schema(),
                                           "Output": output}}}}


@router.get("/v1/models/{owner}/{name}", summary="Replicate: get a model")
async def get_model(owner: str, name: str, request: Request) -> dict:
    return _model_json(ingress(), f"{owner}/{name}", _base(request))


@router.get("/v1/models/{owner}/{name}/versions/{version}", summary="Replicate: get a version")
async def get_version(owner: str, name: str, version: str) -> dict:
    state = ingress()
    model = state.router.resolve(f"{owner}/{name}")
    if state.versions[model.id] != version:
        raise ModelNotFound(f"{owner}/{name}:{version}", list(state.versions))
    return _version_json(state, model.id)


@router.post("/v1/models/{owner}/{name}/predictions", summary="Replicate: run a model")
async def create_model_prediction(owner: str, name: str, body: PredictionBody,
                                  request: Request) -> JSONResponse:
    return await _create(f"{owner}/{name}", None, body, request)


@router.post("/v1/predictions", summary="Replicate: run a model version")
async def create_prediction(body: PredictionBody, request: Request) -> JSONResponse:
    if not body.version:
        raise InvalidField("version", "give a model as owner/name[:version] or a version id")
    ref, _, version = body.version.partition(":")
    state = ingress()
    if "/" not in ref:  # a bare version id
        owners = [m for m, v in state.versions.items() if v == ref]
        if not owners:
            raise ModelNotFound(ref, list(state.versions))
        ref, version = owners[0], ref
    return await _create(ref, version or None, body, request)


async def _create(model_ref: str, version: str | None, body: PredictionBody,
                  request: Request) -> JSONResponse:
    state = ingress()
    model = state.router.resolve(model_ref)
    if version is not None and version != state.versions[model.id]:
        raise InvalidField("version", f"{model.id} is served at version {state.versions[model.id]}")
    gen = _to_request(state, model.id, body.input, request_id(request))
    webhook = None
    if body.webhook:
        check_webhook(body.webhook, state.router.config.webhook_allowed_hosts)
        webhook = WebhookSender(body.webhook, check_events(body.webhook_events_filter),
                                state.webhook_client)
    prediction = Prediction(model=model.id, version=state.versions[model.id],
                            input=body.input.model_dump(exclude_none=True))
    base = _base(request)
    deadline_s = duration_s(request.headers.get("cancel-after"))
    await state.predictions.start(
        prediction, lambda p: _run(state, p, gen, base, webhook, deadline_s))
    wait_s = wait_seconds(request.headers.get("prefer", ""))
    if wait_s:
        await state.predictions.wait(prediction.id, wait_s)
    payload = prediction.to_json(base)
    if wait_s and not prediction.done:
        payload["status"] = "starting"  # as Replicate does when the wait runs out
    if wait_s and prediction.status == "succeeded":
        payload["output"] = [await _data_uri(state, url) for url in prediction.output]
    return JSONResponse(payload, status_code=201 if prediction.done or not wait_s else 202)


async def _data_uri(state: IngressState, url: str) -> str:
    """The file behind one of our output URLs, inline; the URL if it is already gone."""
    stored = await state.store.get_file(url.rsplit("/", 1)[-1])
    if stored is None:
        return url
    return f"data:{stored.media_type};base64,{base64.b64encode(stored.data).decode()}"


def _to_request(state: IngressState, model_id: str, inp: SDXLInput,
                rid: str) -> GenerationRequest:
    model = state.router.resolve(model_id)
    refs = [(inp.lora_weights, inp.lora_scale)] if inp.lora_weights else []
    try:
        return GenerationRequest.for_model(
            model, inp.prompt, width=inp.width, height=inp.height,
            num_inference_steps=inp.num_inference_steps, guidance_scale=inp.guidance_scale,
            seed=inp.seed, scheduler=inp.scheduler, negative_prompt=inp.negative_prompt,
            num_outputs=inp.num_outputs, output_format=inp.output_format,
            output_quality=inp.output_quality, adapters=state.router.adapters_for(model, refs),
            request_id=rid)
    except InvalidField as exc:
        field = "lora_weights" if exc.field == "loras" else exc.field
        raise InvalidField(f"input.{field}", exc.reason) from None


async def _run(state: IngressState, p: Prediction, gen: GenerationRequest, base: str,
               webhook: WebhookSender | None, deadline_s: float | None) -> None:
    """Run the prediction and keep its state; a cancel from any replica stops it, and
    `completed` is still sent. Past `deadline_s` it ends as aborted if it had not
    started, else canceled."""
    p.logs = f"Using seed: {gen.seed}\n"
    started = time.monotonic()
    try:
        if webhook:
            await webhook.send("start", p.to_json(base))
        result = await _unless_canceled(state, p, _retrying(state, p, gen, base, webhook),
                                        deadline_s)
        if result is None and not await state.store.cancel_requested(p.id):  # deadline
            await state.store.request_cancel(p.id)
            p.finish("aborted" if p.status == "starting" else "canceled")
            await state.store.save(p)
            return
        if result is None or await state.store.cancel_requested(p.id):
            p.finish("canceled")
            return
        p.metrics["predict_time"] = round(result.batch.inference_ms / 1000, 3)
        p.logs += f"Generated {len(result.images)} image(s) in {time.monotonic() - started:.2f}s\n"
        urls = [f"{base}/files/{await state.store.put_file(img, result.media_type)}"
                for img in result.images]
        p.finish("succeeded", output=urls)
        await state.store.save(p)
        if webhook:
            await webhook.send("output", p.to_json(base))
    except AtelierError as exc:
        p.finish("failed", error=exc.message)
        await state.store.save(p)
    except Exception:  # never leave an accepted prediction unfinished
        log.exception("prediction %s failed", p.id, extra={"prediction_id": p.id})
        p.finish("failed", error="internal error")
        await state.store.save(p)
    except asyncio.CancelledError:
        p.finish("canceled")  # canceled through this replica; the store already says so
        raise
    finally:
        log.info("prediction %s %s", p.id, p.status,
                 extra={"prediction_id": p.id, "model": p.model, "status": p.status})
        if webhook:
            await asyncio.shield(webhook.send("completed", p.to_json(base)))


async def _retrying(state: IngressState, p: Prediction, gen: GenerationRequest, base: str,
                    webhook: WebhookSender | None) -> GenerationResult:
    """An accepted prediction is not dropped for lack of capacity: while its model is full
    or the replica running it is lost, it is retried with back-off (noted in its logs) for
    up to `prediction_retry_s`."""
    give_up = time.monotonic() + state.router.config.prediction_retry_s
    delay = _FIRST_RETRY_S
    while True:
        try:
            return await _follow(state, p, gen, base, webhook)
        except (Overloaded, ReplicaLost) as exc:
            if time.monotonic() + delay > give_up:
                raise
            p.logs += f"{exc.message}; retrying in {delay:.1f}s\n"
            await state.store.save(p)
            await asyncio.sleep(delay)
            delay = min(2 * delay, _MAX_RETRY_S)


async def _follow(state: IngressState, p: Prediction, gen: GenerationRequest, base: str,
                  webhook: WebhookSender | None) -> GenerationResult:
    """Stream the request: the first step marks the prediction processing; the steps the
    replica reports update its logs (saved and sent at most every few hundred ms), and the
    result completes the progress bar."""
    header, last_saved, total = p.logs, 0.0, gen.num_inference_steps
    async for event in state.router.generate_stream(gen):
        if event[0] == "result":
            p.logs = header + _progress_line(total, total)
            return event[1]
        _, step, total = event
        if p.status == "starting":
            p.status, p.started_at = "processing", now_iso()
        p.logs = header + _progress_line(step, total)
        if time.monotonic() - last_saved >= _SAVE_EVERY_S:
            last_saved = time.monotonic()
            await state.store.save(p)
            if webhook:
                await webhook.send("logs", p.to_json(base))
    raise AtelierError("the model ended the stream without a result")


def _progress_line(step: int, total: int) -> str:
    done = round(20 * step / total)
    return f"{round(100 * step / total):3d}%|{'█' * done}{' ' * (20 - done)}| {step}/{total}\n"


async def _unless_canceled(state: IngressState, p: Prediction, work: Awaitable[GenerationResult],
                           deadline_s: float | None) -> GenerationResult | None:
    """The result of `work`, or None once a cancel is requested or the deadline passes
    (the work is then dropped, which withdraws the request from its replica)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(state.predictions.until_canceled(p.id))
    try:
        await asyncio.wait([task, watch], timeout=deadline_s,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


@router.get("/v1/predictions/{prediction_id}", summary="Replicate: get a prediction")
async def get_prediction(prediction_id: str, request: Request) -> dict:
    prediction = await ingress().store.load(prediction_id)
    if prediction is None:
        raise PredictionNotFound(f"no prediction {prediction_id!r}")
    return prediction.to_json(_base(request))


@router.post("/v1/predictions/{prediction_id}/cancel", summary="Replicate: cancel")
async def cancel_prediction(prediction_id: str, request: Request) -> dict:
    state = ingress()
    prediction = await state.store.load(prediction_id)
    if prediction is None:
        raise PredictionNotFound(f"no prediction {prediction_id!r}")
    await state.predictions.cancel(prediction)
    return prediction.to_json(_base(request))


@router.get("/v1/predictions", summary="Replicate: list predictions, newest first")
async def list_predictions(request: Request, cursor: str | None = None) -> dict:
    page, after = await ingress().store.page(cursor, 100)
    base = _base(request)
    return {"results": [p.to_json(base) for p in page], "previous": None,
            "next": f"{base}/v1/predictions?cursor={after}" if after else None}
