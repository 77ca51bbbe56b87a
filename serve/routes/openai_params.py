"""The fields of the OpenAI Images API's requests: a generation's JSON body, an edit's and
a variation's form fields, checked, and the internal request they make
(`ImageGenerationParams.to_request`)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from serve.adapters import AdapterSet
from serve.config import ModelConfig
from serve.controls import ControlRef
from serve.errors import InvalidField
from serve.option_fields import (
    ClipSkipFields,
    ExtraIPAdapterFields,
    HiresFields,
    MaskedAreaFields,
    PromptPictures,
    UpscaleFields,
    VariationFields,
    json_in_a_form,
)
from serve.types import MAX_SEED, ControlImage, GenerationRequest, ImagePrompt, SourceImage

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# gpt-image's lower quality levels, as shares of the model's default steps.
_QUALITY_SHARES = {"low": 1 / 3, "medium": 2 / 3}


class ImageGenerationParams(ClipSkipFields, HiresFields, UpscaleFields, VariationFields,
                            ExtraIPAdapterFields):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = Field(None, description="Model id or alias; default: the first served.")
    n: int = Field(1, ge=1, le=16, description="Images to make (within the model's limit).")
    size: str = Field("auto", description="WxH (multiples of 8 within the model's limits) or auto.")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "webp", "jpeg"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="webp/jpeg quality.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=(
        "Seed of the first image (the others take the next ones); unset: drawn at random "
        "(an Atelier extension; send it with extra_body)."))
    stream: bool = Field(False, description=(
        "Answer with server-sent events: partial images, then the image (needs n=1)."))
    partial_images: int | None = Field(None, ge=0, le=3, description=(
        "Partial images to stream while the image forms (with stream)."))
    controlnets: list[ControlRef] = Field(default_factory=list, description=(
        "Models with ControlNets (SDXL, plain FLUX): control images that steer the image, "
        "as /generate's controlnets (an Atelier extension; send it with extra_body; in an "
        "edit's form, as JSON)."))
    canny_low_threshold: int | None = Field(None, ge=0, le=500, description=(
        "FLUX.1 Canny models and canny ControlNets: Canny's low edge threshold, as "
        "/generate's (an Atelier extension; send it with extra_body)."))
    canny_high_threshold: int | None = Field(None, ge=0, le=500, description=(
        "Canny's high edge threshold, as /generate's (an Atelier extension)."))
    ip_adapter_image: PromptPictures | None = Field(None, description=(
        "Models with an IP-Adapter: an image prompt, as /generate's ip_adapter_image "
        "(an Atelier extension; send it with extra_body; a mood board's list, in an edit's "
        "form, as JSON)."))
    ip_adapter_scale: float | None = Field(None, ge=0, le=2, description=(
        "How strongly ip_adapter_image steers; default: the adapter's own."))
    redux_image: PromptPictures | None = Field(None, description=(
        "FLUX models with FLUX.1 Redux: an image prompt, as /generate's redux_image (an "
        "Atelier extension; send it with extra_body; a mood board's list, in an edit's "
        "form, as JSON)."))
    redux_downsampling: int | None = Field(None, ge=1, le=9, description=(
        "How far redux_image's (or a variation's image's) grid of tokens is averaged "
        "down: 1 keeps all 729, 3 leaves 81, which weigh less against the prompt; default: "
        "the model's Redux's own."))
    negative_prompt: str = Field("", max_length=4000, description=(
        "What to steer away from (SDXL; an Atelier extension, as the next three: send them "
        "with extra_body)."))
    num_inference_steps: int | None = Field(None, ge=1, description=(
        "Denoising steps; overrides quality. Default: the model's, or quality's share."))
    guidance_scale: float | None = Field(None, ge=0, le=50, description=(
        "Classifier-free guidance (FLUX: its distilled guidance); default: the model's."))
    scheduler: str | None = Field(None, description=(
        "A scheduler as /generate names them; default: the model's."))
    tiling: bool = Field(False, description=(
        "SDXL: an image that tiles, edge to edge both ways, as /generate's (an Atelier "
        "extension; send it with extra_body)."))
    guidance_rescale: float | None = Field(None, ge=0, le=1, description=(
        "SDXL: guidance rescale, as /generate's (an Atelier extension, as clip_skip and the "
        "hires and variation fields: send them with extra_body); default: the model's."))
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "hd",
                     "standard"] | None = Field(
        None, description=("low and medium: a third and two thirds of the model's default "
                           "steps; the others: all of them."))
    style: str | None = Field(None, max_length=100, description=(
        "One of the model's styles (its config's `styles`); ignored by a model that has "
        "none, as DALL-E 3's vivid and natural are."))
    # Accepted for compatibility, without effect here.
    background: str | None = None
    moderation: str | None = None
    complexity: Literal["low", "medium", "high"] | None = None
    user: str | None = None
    safety_identifier: str | None = None

    @field_validator("controlnets", mode="before")
    @classmethod
    def _json_in_a_form(cls, value: Any) -> Any:
        return json_in_a_form(value, "a JSON list")

    def edges(self) -> tuple[int | None, int | None]:
        return self.canny_low_threshold, self.canny_high_threshold

    def steps(self, model: ModelConfig) -> int | None:
        """The denoising steps asked: `num_inference_steps`, else those `quality` asks of
        `model`; None: its default."""
        if self.num_inference_steps is not None:
            return self.num_inference_steps
        share = _QUALITY_SHARES.get(self.quality or "auto")
        return None if share is None else max(1, round(model.defaults.num_inference_steps
                                                        * share))

    def dimensions(self, default: tuple[int | None, int | None]) -> tuple[int | None, int | None]:
        if self.size == "auto":
            return default
        match = _SIZE.match(self.size)
        if not match:
            raise InvalidField("size", f"must be WxH (e.g. 1024x1024) or auto, got {self.size!r}")
        return int(match[1]), int(match[2])


    def to_request(self, model: ModelConfig, request_id: str, prompt: str, adapters: AdapterSet,
                   source: SourceImage | None, width: int | None, height: int | None,
                   controls: tuple[ControlImage, ...] = (),
                   image_prompt: ImagePrompt | None = None,
                   extra_image_prompts: tuple[tuple[str, ImagePrompt], ...] = (),
                   client: str = "", priority: int = 0) -> GenerationRequest:
        """Raises InvalidField (named as `GenerationRequest`'s fields) for values outside
        the model's limits. `prompt` is the one sent without its adapter tags; `source`,
        `controls`, `width` and `height` come from `load_source` and `load_controls`."""
        return GenerationRequest.for_model(
            model, prompt, width=width, height=height, num_outputs=self.n,
            num_inference_steps=self.steps(model), negative_prompt=self.negative_prompt,
            guidance_scale=self.guidance_scale, scheduler=self.scheduler,
            tiling=self.tiling, clip_skip=self.clip_skip,
            guidance_rescale=self.guidance_rescale, **self.hires_args(),
            **self.upscale_args(), **self.variation_args(),
            style=self.style if model.styles else None,
            output_format=self.output_format, source=source, controls=controls,
            image_prompt=image_prompt, extra_image_prompts=extra_image_prompts,
            seed=self.seed, adapters=adapters, output_quality=self.output_compression or 90,
            request_id=request_id, client=client, priority=priority,
            partial_images=(self.partial_images or 0) if self.stream else 0)

class ImageEditParams(ImageGenerationParams, MaskedAreaFields):
    """The text fields of an edit; `size` auto keeps the input image's size."""

    prompt_strength: float = Field(0.8, ge=0, le=1, description=(
        "How far the image may change: 0 returns it, 1 keeps only a trace (an Atelier "
        "extension; send it with extra_body)."))
    input_fidelity: str | None = None


class ImageVariationParams(ImageEditParams):
    """A variation is the image redrawn with no prompt: img2img at `prompt_strength`, each
    image from its own seed; on a FLUX model with FLUX.1 Redux, a new picture with the
    image as its image prompt, at the requested size (auto: the model's default)."""

    prompt: str = Field("", max_length=32000, description=(
        "Optional text to steer the variations (an Atelier extension; send it with "
        "extra_body)."))
