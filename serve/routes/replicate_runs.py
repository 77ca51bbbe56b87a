"""Running a Replicate-style prediction: from its stored input to its stored outcome.

`run_prediction` rebuilds everything from the stored prediction (input, drawn seed,
webhook, Cancel-After deadline), so the replica that took it and a replica that adopts it
after the first one stopped run it the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

from fastapi.exceptions import RequestValidationError

from serve.context import IngressState
from serve.controls import load_controls, load_extra_image_prompts, load_image_prompt
from serve.errors import AtelierError, InvalidField, Overloaded, ReplicaLost, StoreUnavailable
from serve.predictions import Prediction, now_iso, owner_of
from serve.routes.replicate_schemas import (
    ReplicateInput,
    input_class,
    parse_input,
    single_output,
)
from serve.source_images import load_source
from serve.types import GenerationRequest, GenerationResult
from serve.webhooks import WebhookSender

log = logging.getLogger("ray.serve.atelier.replicate")
_SAVE_EVERY_S = 0.25
_FIRST_RETRY_S, _MAX_RETRY_S = 0.5, 10.0


async def run_prediction(state: IngressState, p: Prediction) -> None:
    """Run a stored prediction to its end, keeping its state in the store. Where the
    store stops answering, it is left as last stored: its lease then lapses, and once the
    store answers again a replica adopts it and runs it again from its input and seed."""
    try:
        await _prepare_and_run(state, p)
    except StoreUnavailable:
        log.warning("prediction %s left for a later run: the store does not answer", p.id,
                    extra={"prediction_id": p.id})


async def _prepare_and_run(state: IngressState, p: Prediction) -> None:
    private = p.private
    try:
        gen = state.prepared.pop(p.id, None)  # built when this replica accepted it
        if gen is None:  # adopted: rebuilt from the stored input (URLs fetched again)
            model = state.router.resolve(p.model)  # (its id, or an upscaling alias)
            raw = dict(p.input)
            if "seed" in input_class(model, p.model).model_fields:  # (real-esrgan's has none)
                raw["seed"] = private["seed"]
            inp = parse_input(model, raw, p.model)
            gen = await to_request(state, p.model, inp, private["request_id"],
                                   private.get("client", ""), private.get("priority", 0))
    except StoreUnavailable:
        raise
    except (AtelierError, RequestValidationError) as exc:  # e.g. a redeploy changed the model
        message = getattr(exc, "message", "the stored input does not fit the model any more")
        p.finish("failed", error=message)
        await state.store.save(p)
        return
    webhook = None
    if private.get("webhook"):
        secret = await state.webhook_secret(owner_of(private))
        webhook = WebhookSender(private["webhook"], tuple(private["events"]),
                                state.http_client, secret)
    deadline_s = None
    if private.get("cancel_at") is not None:
        deadline_s = max(0.0, private["cancel_at"] - time.time())
    await _run(state, p, gen, private["base"], webhook, deadline_s)


async def to_request(state: IngressState, model_id: str, inp: ReplicateInput,
                     rid: str, client: str = "", priority: int = 0) -> GenerationRequest:
    model = state.router.resolve(model_id)
    args = inp.request_args()
    width, height = args.pop("width"), args.pop("height")
    try:
        sized, size_from = inp.sizing()
        width, height = (width, height) if sized else (None, None)
        controls, edges = inp.control_params(), inp.edge_thresholds()
        if size_from is not None:  # the control image's size is the input image's too
            made, width, height = await load_controls(controls, None, None, model,
                                                      state.images, size_from, edges)
        source, width, height = await load_source(
            inp.image, inp.mask, inp.prompt_strength, width, height, model, state.images,
            area=inp.source_area(), outpaint=inp.outpainting(), edges=edges,
            references=inp.references(),
            padding_mask_crop=getattr(inp, "padding_mask_crop", None))
        if size_from is None:
            made, width, height = await load_controls(controls, width, height, model,
                                                      state.images, edges=edges)
        image_prompt = await load_image_prompt(inp.image_prompt(), model, state.images)
        extra = await load_extra_image_prompts(inp.extra_prompt_params(), model, state.images)
        return GenerationRequest.for_model(
            model, inp.prompt, width=width, height=height, source=source, seed=inp.seed,
            controls=made, image_prompt=image_prompt, extra_image_prompts=extra,
            adapters=state.router.adapters_for(model, inp.lora_refs()), request_id=rid,
            client=client, priority=priority, safety_check=not inp.disable_safety_checker,
            **args)
    except InvalidField as exc:
        raise type(exc)(f"input.{inp.field_of(exc.field)}", exc.reason) from None


async def _run(state: IngressState, p: Prediction, gen: GenerationRequest, base: str,
               webhook: WebhookSender | None, deadline_s: float | None) -> None:
    """Run the prediction and keep its state; a cancel from any replica stops it, and
    `completed` is still sent. Past `deadline_s` it ends as aborted if it had not
    started, else canceled. One handed over to another replica (this one is stopping)
    is left unfinished for that replica; one adopted from a stopped replica keeps its
    logs and does not send `start` again."""
    adopted = bool(p.logs)
    if not adopted:
        p.logs = f"Using seed: {gen.seed}\n"
    started, left = time.monotonic(), False
    try:
        if webhook and not adopted:
            webhook.send("start", p.to_json(base))
        result = await _unless_canceled(state, p, _retrying(state, p, gen, base, webhook),
                                        deadline_s)
        if result is None and not await state.store.cancel_requested(p.id):  # deadline
            await state.store.request_cancel(p.id)
            p.finish("aborted" if p.status == "starting" else "canceled")
            await state.store.save(p)
            return
        if result is None or await state.store.cancel_requested(p.id):
            p.finish("canceled")  # (saved by the canceller too, unless its save failed)
            await state.store.save(p)
            return
        await _succeed(state, p, gen, base, result, started)
        if webhook:
            webhook.send("output", p.to_json(base))
    except StoreUnavailable:
        left = True  # (run_prediction: run again once the store answers)
        raise
    except AtelierError as exc:
        p.finish("failed", error=exc.message)
        await state.store.save(p)
    except Exception:  # never leave an accepted prediction unfinished
        log.exception("prediction %s failed", p.id, extra={"prediction_id": p.id})
        p.finish("failed", error="internal error")
        await state.store.save(p)
    except asyncio.CancelledError:
        if not state.predictions.handing_over:
            p.finish("canceled")  # canceled through this replica; the store says so
        raise
    finally:
        log.info("prediction %s %s", p.id, p.status,
                 extra={"prediction_id": p.id, "model": p.model, "status": p.status})
        if webhook and not state.predictions.handing_over and not left:
            webhook.complete(p.to_json(base))


async def _succeed(state: IngressState, p: Prediction, gen: GenerationRequest, base: str,
                   result: GenerationResult, started: float) -> None:
    """Finish `p` with `result`: its images stored as output files, its notes and flagged
    images in its logs, its predict time; then save it. Raises ContentFlagged (as
    Replicate's models fail) when every image was flagged."""
    p.metrics["predict_time"] = round(result.batch.inference_ms / 1000, 3)
    p.logs += "".join(f"{note}\n" for note in result.notes)
    p.logs += "".join(f"NSFW content detected in image {i}\n"
                      for i, flagged in enumerate(result.nsfw) if flagged)
    result = result.unflagged()
    p.logs += f"Generated {len(result.images)} image(s) in {time.monotonic() - started:.2f}s\n"
    urls = [f"{base}/files/{await state.store.put_file(img, result.media_type)}"
            for img in result.images]
    p.finish("succeeded", output=urls[0] if single_output(
        state.router.resolve(gen.model), p.model) else urls)
    await state.store.save(p)


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
            await _save_progress(state, p)
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
        if event[0] != "progress":
            continue
        _, step, total = event
        if p.status == "starting":
            p.status, p.started_at = "processing", now_iso()
        p.logs = header + _progress_line(step, total)
        if time.monotonic() - last_saved >= _SAVE_EVERY_S:
            last_saved = time.monotonic()
            await _save_progress(state, p)
            if webhook:
                webhook.send("logs", p.to_json(base))
    raise AtelierError("the model ended the stream without a result")


async def _save_progress(state: IngressState, p: Prediction) -> None:
    """Progress is saved where the store answers; the end is saved, or the prediction is
    left for a later run (run_prediction)."""
    try:
        await state.store.save(p)
    except StoreUnavailable:
        pass


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


