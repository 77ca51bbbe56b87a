"""OpenAI Images API: `POST /v1/images/generations`, for the official `openai` client.

Fields OpenAI's newer models take but a diffusion model has no use for (quality, style,
background, moderation, user, ...) are accepted and ignored, so unchanged client code
keeps working; anything else unknown is a 400 naming the field.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from serve.context import ingress, request_id
from serve.errors import InvalidField
from serve.types import GenerationRequest

router = APIRouter()
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class ImageGenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = Field(None, description="Model id or alias; default: the first served.")
    n: int = Field(1, ge=1, le=16, description="Images to make (within the model's limit).")
    size: str = Field("auto", description="WxH (multiples of 8 within the model's limits) or auto.")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "webp", "jpeg"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="webp/jpeg quality.")
    # Accepted for compatibility, without effect here.
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    safety_identifier: str | None = None

    def dimensions(self, default: tuple[int, int]) -> tuple[int, int]:
        if self.size == "auto":
            return default
        match = _SIZE.match(self.size)
        if not match:
            raise InvalidField("size", f"must be WxH (e.g. 1024x1024) or auto, got {self.size!r}")
        return int(match[1]), int(match[2])


@router.post("/v1/images/generations", summary="OpenAI Images: create images")
async def create_images(params: ImageGenerationParams, request: Request) -> dict:
    state = ingress()
    model = state.router.resolve(params.model)
    width, height = params.dimensions((model.defaults.width, model.defaults.height))
    try:
        gen = GenerationRequest.for_model(
            model, params.prompt, width=width, height=height, num_outputs=params.n,
            output_format=params.output_format,
            output_quality=params.output_compression or 90, request_id=request_id(request))
    except InvalidField as exc:
        field = {"width": "size", "height": "size", "num_outputs": "n"}.get(exc.field, exc.field)
        raise type(exc)(field, exc.reason) from None
    result = await state.router.generate(gen)
    if params.response_format == "url":
        base = str(request.base_url).rstrip("/")
        data = [{"url": f"{base}/files/{await state.store.put_file(img, result.media_type)}"}
                for img in result.images]
    else:
        data = [{"b64_json": base64.b64encode(img).decode("ascii")} for img in result.images]
    return {"created": int(time.time()), "data": data, "output_format": params.output_format,
            "size": f"{width}x{height}"}
