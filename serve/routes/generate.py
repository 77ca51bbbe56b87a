"""`POST /generate`: the interface of a plain FastAPI + diffusers server.

Fields come as query parameters, a JSON body, or both (the body wins on a clash). The
answer is JSON with base64 images, or the first image itself when the client's `Accept`
prefers the image's type (`image/png`, or webp/jpeg as `output_format` asks; `image/*`)
to JSON: `Accept: image/png` does, as do `image/*` and `image/*, */*;q=0.8`; no
`Accept`, `*/*`, `image/png;q=0` and `application/json, image/png;q=0.5` get JSON.
Without `output_format`, the format is the image type `Accept` prefers (`image/webp`:
WebP), PNG where it prefers none.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serve.adapters import split_prompt_tags
from serve.context import charge_images, ingress, model_for, request_id, requester
from serve.controls import (
    image_prompt_params,
    load_controls,
    load_extra_image_prompts,
    load_image_prompt,
)
from serve.errors import InvalidField
from serve.routes.generate_params import GenerateParams
from serve.source_images import load_source
from serve.timing import timing_headers
from serve.types import MEDIA_TYPES, GenerationRequest, GenerationResult, OutputFormat

router = APIRouter()


def _inline(node: Any, defs: dict) -> Any:
    """The JSON schema with local `$ref`s replaced by their definitions (for openapi_extra,
    which cannot add components)."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


_SCHEMA = GenerateParams.model_json_schema()
_SCHEMA = _inline(_SCHEMA, _SCHEMA.get("$defs", {}))
_OPENAPI = {
    "parameters": [{"name": name, "in": "query", "required": False,
                    "schema": _SCHEMA["properties"][name]}
                   for name in GenerateParams.model_fields
                   if name not in ("loras", "image", "mask", "control_image", "controlnets",
                                   "ip_adapter_image", "redux_image", "outpaint",
                                   "extra_ip_adapters")],
    "requestBody": {"required": False, "content": {"application/json": {"schema": _SCHEMA}}},
}


@router.post("/generate", openapi_extra=_OPENAPI, summary="Generate images")
async def generate(request: Request) -> Response:
    params, sources = await _read_params(request)
    state = ingress()
    router_ = state.router
    model = model_for(request, params.model)
    if "output_format" not in params.model_fields_set:
        params.output_format = format_for(request.headers.get("accept", ""))
    try:
        prompt, tags = split_prompt_tags(params.prompt)
        adapters = router_.adapters_for(model, [(r.name, r.scale) for r in params.loras] + tags)
        edges = (params.canny_low_threshold, params.canny_high_threshold)
        source, width, height = await load_source(
            params.image, params.mask, params.prompt_strength, params.width, params.height,
            model, state.images, outpaint=params.outpaint_sides(), edges=edges,
            references=params.reference_images, padding_mask_crop=params.padding_mask_crop)
        controls, width, height = await load_controls(params.control_params(), width, height,
                                                      model, state.images, edges=edges)
        if not params.prompt and params.redux_image is None:
            raise InvalidField("prompt", "say what to draw (only a redux_image may stand in "
                                         "for a prompt)")
        image_prompt = await load_image_prompt(image_prompt_params(params), model,
                                               state.images)
        extra = await load_extra_image_prompts(params.extra_prompt_params(), model,
                                               state.images)
        gen = params.to_request(model, request_id(request), prompt, adapters, source, width,
                                height, controls=controls, image_prompt=image_prompt,
                                extra_image_prompts=extra, **requester(request))
    except InvalidField as exc:
        field = "steps" if exc.field == "num_inference_steps" else exc.field
        raise type(exc)(field, exc.reason, sources.get(field, "body")) from None
    await charge_images(request, gen.num_outputs)
    result = await router_.generate(gen)
    return _respond(request, gen, result)


async def _read_params(request: Request) -> tuple[GenerateParams, dict[str, str]]:
    """Merge query and JSON body; return the params and where each field came from (a
    field not sent: the body if there is one, else the query).

    Raises RequestValidationError located at ("query"|"body", field).
    """
    values: dict[str, Any] = dict(request.query_params)
    sources = dict.fromkeys(values, "query")
    raw = await request.body()
    if raw.strip():
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidField("", f"invalid JSON: {exc}", "body") from None
        if not isinstance(body, dict):
            raise InvalidField("", "must be a JSON object", "body")
        values.update(body)
        sources.update(dict.fromkeys(body, "body"))
    sources = dict.fromkeys(GenerateParams.model_fields, "body" if raw.strip() else "query"
                            ) | sources
    try:
        return GenerateParams.model_validate(values), sources
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            err["loc"] = (sources.get(field, "body"), *err["loc"])
            errors.append(err)
        raise RequestValidationError(errors) from None


def _quality(accept: str, media_type: str) -> tuple[float, int]:
    """The quality `accept` gives `media_type`, from its most specific range naming it
    (2: the type itself, 1: type/*, 0: */*; -1 and quality 0 where none does)."""
    ranks = {media_type: 2, media_type.split("/")[0] + "/*": 1, "*/*": 0}
    best, rank = 0.0, -1
    for part in accept.lower().split(","):
        range_, *params = (item.strip() for item in part.split(";"))
        named = ranks.get(range_, -1)
        if named <= rank:
            continue
        q = next((value.strip() for name, _, value in (p.partition("=") for p in params)
                  if name.strip() == "q"), "1")
        try:
            quality = float(q)
        except ValueError:
            continue  # a malformed range names nothing
        if 0 <= quality <= 1:
            best, rank = quality, named
    return best, rank


def format_for(accept: str) -> OutputFormat:
    """The format of a request that names no `output_format`: the image type `accept`
    gives the highest quality (its most specific range decides; PNG on a tie)."""
    ranked = {fmt: _quality(accept, media) for fmt, media in MEDIA_TYPES.items()}
    return max(ranked, key=lambda fmt: (*ranked[fmt], fmt == "png"))


def wants_image(accept: str, media_type: str) -> bool:
    """Whether `accept` prefers the image itself to JSON: a higher quality, or the same
    with the image's own type named (JSON is the answer where nothing decides)."""
    image, rank = _quality(accept, media_type)
    json_quality, _ = _quality(accept, "application/json")
    return image > 0 and (image > json_quality or (image == json_quality and rank == 2))


def _respond(request: Request, gen: GenerationRequest, result: GenerationResult) -> Response:
    headers = timing_headers(result)
    headers["X-Atelier-Seed"] = str(result.seeds[0])
    if result.nsfw:  # checked: as diffusers' pipelines answer, a flagged image is black
        headers["X-Atelier-NSFW-Content-Detected"] = ",".join(
            str(flag).lower() for flag in result.nsfw)
    if wants_image(request.headers.get("accept", ""), result.media_type):
        return Response(result.images[0], media_type=result.media_type, headers=headers)
    images = [base64.b64encode(img).decode("ascii") for img in result.images]
    body = {"image": images[0], "images": images, "seed": result.seeds[0],
            "seeds": result.seeds, "model": gen.model, "width": result.width,
            "height": result.height, "media_type": result.media_type}
    if result.nsfw:
        body["nsfw_content_detected"] = list(result.nsfw)
    if result.notes:
        body["warnings"] = list(result.notes)
    return JSONResponse(body, headers=headers)
