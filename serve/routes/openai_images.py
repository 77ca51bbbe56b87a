"""OpenAI Images API for the official `openai` client: `POST /v1/images/generations`,
`POST /v1/images/edits` (multipart: `image`, optional `mask`, `prompt`, `model`, `n`,
`size`, `response_format`; an edit is img2img, or inpainting with a mask: its
transparent part, as OpenAI's masks mark it, or its white part for an opaque one; with no
mask, the image's own transparent part; a `markup` file, a transparent PNG of the
image's size, is laid over the image, whose marked-up picture is then edited; on a Kontext
model an edit by instruction, which reads further image files as further references) and
`POST /v1/images/variations` (multipart: `image`, `model`, `n`, `size`, `response_format`; an
edit with no prompt, or on a FLUX model with FLUX.1 Redux, Redux's variation: the image is
the image prompt of a new picture).

`quality` sets the effort as gpt-image models take it: `low` and `medium` run a third and
two thirds of the model's default steps; `high`, `xhigh`, `max`, `auto` and DALL-E 3's `hd`
and `standard` run them all. Fields OpenAI's newer models take but a diffusion model has no
use for (background, moderation, complexity, user, ...) are accepted and ignored, so unchanged client code
keeps working; `style` names one of the model's styles where it has some (DALL-E 3's
`vivid` and `natural` are ignored by a model without styles); anything else unknown is a 400 naming the field. The API has no adapter
field: a `<lora:name:scale>` tag in the prompt applies a catalog adapter, as on
`/generate`. `seed`, `controlnets`, `ip_adapter_image`, `ip_adapter_scale`, `redux_image`
and `redux_downsampling` (and `prompt_strength` for edits) are Atelier extensions, sent with
the client's `extra_body`.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from serve.adapters import split_prompt_tags
from serve.config import ModelConfig
from serve.context import (
    IngressState,
    base_url,
    charge_images,
    ingress,
    model_for,
    multipart_form,
    request_id,
    requester,
)
from serve.controls import (
    ImagePromptParams,
    image_prompt_params,
    listed,
    load_controls,
    load_extra_image_prompts,
    load_image_prompt,
)
from serve.errors import InvalidField
from serve.images import marked_up
from serve.model_parts import MOST_REFERENCES
from serve.routes.openai_params import (
    ImageEditParams,
    ImageGenerationParams,
    ImageVariationParams,
)
from serve.routes.openai_stream import stream_images
from serve.source_images import REFERENCES, load_source
from serve.types import SourceImage

router = APIRouter()
_FIELDS = {"width": "size", "height": "size", "num_outputs": "n", "loras": "prompt"}


@router.post("/v1/images/generations", summary="OpenAI Images: create images",
             response_model=None)
async def create_images(params: ImageGenerationParams,
                        request: Request) -> dict | StreamingResponse:
    state = ingress()
    model = model_for(request, params.model)
    width, height = params.dimensions((None, None))
    return await _generate(state, request, params, model, None, width, height)


def _multipart(params: type[BaseModel], *files: str) -> dict:
    """The OpenAPI request body of a multipart route: its image files and text fields."""
    schema = params.model_json_schema()
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image", *schema.get("required", [])], "properties": {
            **{name: {"type": "string", "format": "binary"} for name in files},
            **schema["properties"]}}}}}}


@router.post("/v1/images/edits", summary="OpenAI Images: edit an image",
             openapi_extra=_multipart(ImageEditParams, "image", "mask"), response_model=None)
async def edit_images(request: Request) -> dict | StreamingResponse:
    return await _edit(request, ImageEditParams)


@router.post("/v1/images/variations", summary="OpenAI Images: variations of an image",
             openapi_extra=_multipart(ImageVariationParams, "image"), response_model=None)
async def create_variations(request: Request) -> dict | StreamingResponse:
    return await _edit(request, ImageVariationParams)


async def _edit(request: Request, kind: type[ImageEditParams]) -> dict | StreamingResponse:
    state = ingress()
    params, (image, *further), mask, markup = await _read_edit(request, kind)
    if mask is not None and kind is ImageVariationParams:
        raise InvalidField("mask", "variations take no mask; send it to /v1/images/edits")
    if further and kind is ImageVariationParams:
        raise InvalidField("image", "a variation is of one image")
    model = model_for(request, params.model)
    width, height = params.dimensions((None, None))
    if markup is not None:  # the marked-up picture is the one edited
        image = await asyncio.to_thread(marked_up, image, markup, model.limits.max_image_bytes,
                                        model.limits.max_image_pixels)
    if kind is ImageVariationParams and model.redux is not None:
        if image_prompt_params(params).image is not None:
            raise InvalidField("redux_image", "a variation's image is its image prompt: send "
                                              "no other")
        redux = ImagePromptParams(image, None, "image", params.redux_downsampling)
        return await _generate(state, request, params, model, None, width, height, redux)
    try:
        source, width, height = await load_source(
            image, mask, params.prompt_strength, width, height, model, state.images,
            hole_is_mask=kind is not ImageVariationParams, edges=params.edges(),
            references=further, padding_mask_crop=params.padding_mask_crop)
    except InvalidField as exc:
        field = "image" if exc.field.startswith(REFERENCES) else exc.field
        raise type(exc)(_FIELDS.get(field, field), exc.reason) from None
    return await _generate(state, request, params, model, source, width, height)


async def _read_edit(request: Request, kind: type[ImageEditParams],
                     ) -> tuple[ImageEditParams, list[bytes], bytes | None, bytes | None]:
    """The edit's text fields, its image files (the one to edit first; a Kontext model
    reads the others as further references), its mask file and its markup file (an
    edit's, not a variation's). Raises InvalidField (400)."""
    files: dict[str, list[bytes]] = {}
    fields: dict[str, Any] = {}
    async with multipart_form(request, "", max_files=MOST_REFERENCES + 1,
                              max_fields=64) as form:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.setdefault(name.removesuffix("[]"), []).append(await value.read())
            else:
                fields[name] = value
    images, masks = files.pop("image", []), files.pop("mask", [])
    markups = files.pop("markup", []) if kind is ImageEditParams else []
    if not images:
        raise InvalidField("image", "send an image file (PNG, JPEG or WebP)")
    if len(masks) > 1 or len(markups) > 1 or files:
        name = "mask" if len(masks) > 1 else "markup" if len(markups) > 1 else next(iter(files))
        raise InvalidField(name, "unexpected file field")
    if masks and markups:
        raise InvalidField("markup", "a markup cannot be combined with a mask")
    try:
        params = kind.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    return params, images, masks[0] if masks else None, markups[0] if markups else None


async def _generate(state: IngressState, request: Request, params: ImageGenerationParams,
                    model: ModelConfig, source: SourceImage | None, width: int | None,
                    height: int | None, prompt_image: ImagePromptParams | None = None,
                    ) -> dict | StreamingResponse:
    if params.stream and params.n != 1:
        raise InvalidField("n", "a streamed answer carries one image: n must be 1")
    try:
        # Without an input or control image the size is the model's default.
        controls, width, height = await load_controls(listed(params.controlnets), width,
                                                      height, model, state.images,
                                                      edges=params.edges())
        image_prompt = await load_image_prompt(prompt_image or image_prompt_params(params),
                                               model, state.images)
        extra = await load_extra_image_prompts(params.extra_prompt_params(), model,
                                               state.images)
        # The OpenAI API has no adapter field: `<lora:name:scale>` tags in the prompt name them.
        prompt, tags = split_prompt_tags(params.prompt)
        adapters = state.router.adapters_for(model, tags)
        gen = params.to_request(model, request_id(request), prompt, adapters, source, width,
                                height, controls=controls, image_prompt=image_prompt,
                                extra_image_prompts=extra, **requester(request))
    except InvalidField as exc:
        raise type(exc)(_FIELDS.get(exc.field, exc.field), exc.reason) from None
    await charge_images(request, gen.num_outputs)
    if params.stream:
        kind = "image_edit" if isinstance(params, ImageEditParams) else "image_generation"
        return await stream_images(state, gen, kind)
    result = (await state.router.generate(gen)).unflagged()  # 400 if all are flagged
    if params.response_format == "url":
        base = base_url(request)
        data = [{"url": f"{base}/files/{await state.store.put_file(img, result.media_type)}"}
                for img in result.images]
    else:
        data = [{"b64_json": base64.b64encode(img).decode("ascii")} for img in result.images]
    # As gpt-image models answer: the quality asked, and the images' background (opaque:
    # a diffusion model's images have no transparency).
    return {"created": int(time.time()), "data": data, "output_format": params.output_format,
            "size": f"{result.width}x{result.height}", "quality": params.quality or "auto",
            "background": "opaque"}
