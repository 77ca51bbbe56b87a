"""Request fields every API names alike (`/generate`, Replicate's SDXL and FLUX inputs,
OpenAI's `extra_body`): SDXL's clip skip, the hires pass, enlarging the finished images,
seed variations and inpainting only the masked area. Each API's parameters take them from
these mixins and hand them on with `hires_args`, `upscale_args`, `variation_args` or by
name."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from serve.controls import ImagePromptParams
from serve.model_extras import MOST_CLIP_SKIP
from serve.types import MAX_SEED, MOST_PROMPT_PICTURES, IPAdapterBlocks


class ClipSkipFields(BaseModel):
    """SDXL's clip skip (`prompts.clip_skip`)."""

    clip_skip: int | None = Field(None, ge=0, le=MOST_CLIP_SKIP, description=(
        "SDXL: read the prompt this many text-encoder layers before the penultimate "
        "(diffusers' clip_skip; the WebUI's Clip skip 2 is 0); default: the model's."))


class HiresFields(BaseModel):
    """The hires pass of SDXL and plain FLUX models: the WebUI's hires. fix."""

    hires_scale: float = Field(1.0, ge=1, le=4, description=(
        "SDXL, FLUX: above 1, a second pass (the WebUI's hires. fix): each image is "
        "upscaled by this much and redrawn by img2img at hires_strength, for more detail "
        "at sizes the model does not compose well at; the answer's images are that size."))
    hires_strength: float = Field(0.5, gt=0, le=1, description=(
        "How much of the upscaled image the second pass redraws."))
    hires_steps: int | None = Field(None, ge=1, description=(
        "The second pass's steps (it runs steps x strength of them); default: the "
        "request's steps."))
    hires_upscaler: str | None = Field(None, max_length=100, description=(
        "What upscales the images before the second pass: one of the model's upscalers "
        "(GET /v1/models lists them) or bicubic; default: the model's first, or bicubic."))

    def hires_args(self) -> dict[str, Any]:
        return {"hires_scale": self.hires_scale, "hires_strength": self.hires_strength,
                "hires_steps": self.hires_steps, "hires_upscaler": self.hires_upscaler}


class UpscaleFields(BaseModel):
    """Enlarging the finished images (SDXL models and plain FLUX ones)."""

    upscale: float = Field(1.0, ge=1, le=4, description=(
        "Above 1: each finished image is enlarged this much by `upscaler`, not redrawn "
        "(the WebUI's Extras tab); with an image at prompt_strength 0, the image itself is "
        "enlarged. The answer's images are that size."))
    upscaler: str | None = Field(None, max_length=100, description=(
        "What enlarges them: one of the model's upscalers (GET /v1/models lists them) or "
        "bicubic; default: the model's first, or bicubic."))

    def upscale_args(self) -> dict[str, Any]:
        return {"upscale": self.upscale, "upscaler": self.upscaler}


def json_in_a_form(value: Any, what: str) -> Any:
    """A field's value, which a multipart form (OpenAI's edits) carries as JSON text
    (`what` it should be)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not {what}: {exc}") from None
    return value


def _pictures_field(value: Any) -> Any:
    # A form's text field may hold a JSON list (no picture's text starts with "["). The
    # count is checked here, so that its error names the field itself.
    if isinstance(value, str) and value.lstrip().startswith("["):
        value = json_in_a_form(value, "a JSON list of pictures")
    if isinstance(value, list) and not 1 <= len(value) <= MOST_PROMPT_PICTURES:
        raise ValueError(f"send 1 to {MOST_PROMPT_PICTURES} pictures, not {len(value)}")
    return value


# An image prompt: a picture, or a mood board of several (a JSON list; in a form, as JSON
# text).
PromptPictures = Annotated[
    str | Annotated[list[str], Field(min_length=1, max_length=MOST_PROMPT_PICTURES)],
    BeforeValidator(_pictures_field)]
MOOD_BOARD = (f"A list of up to {MOST_PROMPT_PICTURES} pictures is a mood board: the adapter "
              "reads them all together.")
REDUX_BOARD = (f"A list of up to {MOST_PROMPT_PICTURES} pictures is a mood board: each one's "
               "tokens follow the prompt's, in order.")


class ExtraImagePrompt(BaseModel):
    """An image prompt for one of a model's further IP-Adapters."""

    model_config = ConfigDict(extra="forbid")

    image: PromptPictures = Field(description=(
        "The picture: a data URI, base64 or an allowed URL, as ip_adapter_image takes it. "
        + MOOD_BOARD))
    scale: float | None = Field(None, ge=0, le=2, description=(
        "How strongly it steers; default: that adapter's own (config)."))
    mask: str | None = Field(None, description=(
        "Where it steers, as ip_adapter_mask says for ip_adapter_image."))
    blocks: IPAdapterBlocks = Field("all", description=(
        "Which attention blocks it steers, as ip_adapter_blocks says for ip_adapter_image."))


class ExtraIPAdapterFields(BaseModel):
    """The SDXL-only parts of image prompts: masks, and image prompts for a model's
    further IP-Adapters (`ip_adapter.extra`)."""

    ip_adapter_mask: str | None = Field(None, description=(
        "SDXL models with an IP-Adapter: where ip_adapter_image (one picture) steers, as an "
        "image (as ip_adapter_image takes it; stretched to the output's size): white where "
        "it does, black where it does not (diffusers' ip_adapter_masks), for a face or a "
        "product in one part of the image."))
    ip_adapter_blocks: IPAdapterBlocks = Field("all", description=(
        "SDXL models with an IP-Adapter: which of the UNet's attention blocks "
        "ip_adapter_image steers (InstantStyle): all; style (the picture's look, not its "
        "content: colours, texture, brushwork); layout (its composition); or "
        "style_and_layout."))

    extra_ip_adapters: dict[str, ExtraImagePrompt] = Field(
        default_factory=dict, max_length=4, description=(
            "SDXL models with further IP-Adapters (GET /v1/models lists them): an image "
            "prompt for each by its name, {\"image\": ..., \"scale\": ...}, beside or "
            "without ip_adapter_image (JSON body; in an edit's form, as JSON)."))

    @field_validator("extra_ip_adapters", mode="before")
    @classmethod
    def _prompts_json_in_a_form(cls, value: Any) -> Any:
        return json_in_a_form(value, "a JSON object")

    def extra_prompt_params(self) -> dict[str, ImagePromptParams]:
        """Each further adapter's image prompt, by name, as `load_extra_image_prompts`
        takes them."""
        return {name: ImagePromptParams(p.image, p.scale, mask=p.mask, blocks=p.blocks)
                for name, p in self.extra_ip_adapters.items()}


class VariationFields(BaseModel):
    """Seed variations (the WebUI's variation seed), for the models that draw them."""

    variation_seed: int | None = Field(None, ge=0, le=MAX_SEED, description=(
        "Text-to-image (SDXL, FLUX, Kontext): a second seed whose noise variation_strength "
        "moves towards (image i: variation_seed + i)."))
    variation_strength: float = Field(0.0, ge=0, le=1, description=(
        "0: the seed's image; small values: variations close to it; 1: the variation "
        "seed's own image."))

    def variation_args(self) -> dict[str, Any]:
        return {"variation_seed": self.variation_seed,
                "variation_strength": self.variation_strength}


class MaskedAreaFields(BaseModel):
    """Inpainting only the masked area (`serve.inpaint_area`)."""

    padding_mask_crop: int | None = Field(None, ge=0, le=4096, description=(
        "Inpaint only the masked area (diffusers' padding_mask_crop, the WebUI's \"only "
        "masked\"): the region around the mask, this many pixels wider on each side, is "
        "drawn at width x height (default: the model's default size) and laid back into "
        "the image, which the answer has at its own size; for small areas of large images."))
