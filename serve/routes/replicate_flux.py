"""Replicate's FLUX model inputs: `black-forest-labs/flux-dev`'s (with `flux-redux-dev`'s
image prompt and `xlabs-ai/flux-dev-controlnet`'s ControlNet inputs), `flux-kontext-dev`'s,
`flux-fill-dev`'s, `flux-canny-dev`'s and `flux-depth-dev`'s, with their LoRA models' LoRA
inputs."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from serve.canvases import OUTPAINT_PRESETS
from serve.controls import ControlParams, ImagePromptParams, image_prompt_params
from serve.option_fields import (
    REDUX_BOARD,
    HiresFields,
    MaskedAreaFields,
    PromptPictures,
    UpscaleFields,
    VariationFields,
)
from serve.routes.replicate_inputs import CannyEdgeInputs, IPAdapterInputs, LoraInput
from serve.source_images import INPUT_AREA, REFERENCES
from serve.types import MAX_SEED

# Output sizes of FLUX at one megapixel per aspect ratio (multiples of 16); 0.25 MP halves
# each side.
FLUX_SIZES = {"1:1": (1024, 1024), "16:9": (1344, 768), "21:9": (1536, 640),
              "3:2": (1216, 832), "2:3": (832, 1216), "4:5": (896, 1088), "5:4": (1088, 896),
              "3:4": (896, 1152), "4:3": (1152, 896), "9:16": (768, 1344), "9:21": (640, 1536)}
# Kontext's ratios: those, and flux-kontext-pro's and multi-image-kontext's 2:1 and 1:2.
KONTEXT_SIZES = FLUX_SIZES | {"2:1": (1408, 704), "1:2": (704, 1408)}


class _FluxCommon(LoraInput):
    """The inputs Replicate's FLUX models share: steps, guidance (FLUX's distilled
    guidance), seed, output format and quality, go_fast and the safety checker's switch."""

    num_inference_steps: int | None = Field(None, ge=1, le=50, description="Denoising steps")
    guidance: float | None = Field(None, ge=0, le=10, description="Guidance for the process")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; blank: random")
    output_format: Literal["webp", "jpg", "png"] = Field("webp", description="Image format")
    output_quality: int = Field(80, ge=0, le=100, description="webp/jpg quality")
    go_fast: bool = Field(True, description="Accepted; the model's speed settings apply")
    disable_safety_checker: bool = Field(False, description=(
        "Skip the model's safety checker (if it has one and lets requests skip it)"))
    style: str | None = Field(None, max_length=100, description=(
        "One of the model's styles (GET /v1/models lists them); blank: none"))

    def call_args(self) -> dict[str, Any]:
        """Steps, guidance, the style, and the output format and quality as requests take
        them."""
        return {"num_inference_steps": self.num_inference_steps, "style": self.style,
                "guidance_scale": self.guidance,
                "output_format": "jpeg" if self.output_format == "jpg" else self.output_format,
                "output_quality": max(1, self.output_quality)}

    def field_of(self, arg: str) -> str:
        return super().field_of({"guidance_scale": "guidance"}.get(arg, arg))


class _ReduxInputs(_FluxCommon):
    """flux-redux-dev's `redux_image`, for models with FLUX.1 Redux (others refuse it),
    and how far its tokens are averaged down."""

    redux_image: PromptPictures | None = Field(None, description=(
        "Input image to condition the output on (FLUX.1 Redux): the output is a variation "
        "of it, restyled by the prompt if one is given; as image takes it. " + REDUX_BOARD))
    redux_downsampling: int | None = Field(None, ge=1, le=9, description=(
        "How far redux_image's grid of tokens is averaged down (1: all 729; 3: 81, which "
        "weigh less against the prompt); default: the model's Redux's own"))

    def image_prompt(self) -> ImagePromptParams:
        return ImagePromptParams(self.redux_image, None, "redux_image",
                                 self.redux_downsampling)


class FluxControlNetInputs(CannyEdgeInputs, _FluxCommon):
    """xlabs-ai/flux-dev-controlnet's ControlNet inputs, for FLUX models with ControlNets
    (others refuse them): a control image, which of the model's ControlNets reads it
    (`control_type`) and how strongly."""

    control_image: str | None = Field(None, description=(
        "Image whose shapes the output follows, through one of the model's ControlNets: "
        "the map itself, or a picture for a ControlNet that preprocesses (canny). The "
        "output takes its size unless aspect_ratio or an image is given"))
    control_type: str | None = Field(None, max_length=200, description=(
        "Which of the model's ControlNets reads control_image (GET /v1/models lists them); "
        "default: the first"))
    control_strength: float | None = Field(None, ge=0, le=4, description=(
        "How strongly control_image steers; default: the ControlNet's own"))

    def control_params(self) -> list[ControlParams]:
        if self.control_image is None:
            return []
        return [ControlParams(self.control_image, self.control_type, self.control_strength,
                              fields=("control_type", "control_image", "control_image"))]


class FluxInput(FluxControlNetInputs, IPAdapterInputs, _ReduxInputs, HiresFields,
                UpscaleFields, VariationFields, MaskedAreaFields):
    """black-forest-labs/flux-dev's inputs, with the LoRA inputs of flux-dev-lora, the
    LoRA and mask inputs of Replicate's trained FLUX models (`extra_lora`, `mask`),
    flux-redux-dev's `redux_image` (for a model with FLUX.1 Redux, which then needs no
    prompt), the SDXL models' `ip_adapter_image` (for a model with an IP-Adapter) and hires
    pass, and xlabs-ai/flux-dev-controlnet's ControlNet inputs (for a model with
    ControlNets); unset values take the served model's defaults."""

    prompt: str = Field("", max_length=4000, validate_default=True, description=(
        "Prompt for generated image; optional with a redux_image"))
    aspect_ratio: Literal[tuple(FLUX_SIZES)] | None = Field(None, description=(
        "Aspect ratio of the output; unset: the model's default size. Ignored with an "
        "image, whose size the output follows"))
    megapixels: Literal["1", "0.25"] = Field("1", description="Approximate megapixels")
    image: str | None = Field(None, description=(
        "Input image for img2img or inpaint mode, as a data URI (or base64)"))
    mask: str | None = Field(None, description=(
        "Input mask for inpaint mode, as on Replicate's trained FLUX models: white areas "
        "are repainted, black kept"))
    prompt_strength: float = Field(0.8, ge=0, le=1, description=(
        "Prompt strength with img2img / inpaint; 1.0 destroys the input image's "
        "information"))
    num_outputs: int = Field(1, ge=1, le=4, description="Number of outputs to generate")
    extra_lora: str | None = Field(None, description=(
        "A second LoRA (a name from GET /v1/loras or a file URL), stacked on "
        "lora_weights"))
    extra_lora_scale: float | None = Field(None, ge=-4, le=4, description=(
        "Scale of extra_lora"))

    @field_validator("prompt")
    @classmethod
    def _prompt_or_redux(cls, prompt: str, info: ValidationInfo) -> str:
        if not prompt and info.data.get("redux_image") is None:
            raise ValueError("a prompt is required (only a redux_image may stand in for one)")
        return prompt

    def request_args(self) -> dict[str, Any]:
        width = height = None
        if self.aspect_ratio is not None and self.image is None:
            width, height = FLUX_SIZES[self.aspect_ratio]
            if self.megapixels == "0.25":
                width, height = width // 2, height // 2
        return {"width": width, "height": height, "num_outputs": self.num_outputs,
                **self.hires_args(), **self.upscale_args(), **self.variation_args(),
                **self.call_args()}

    def image_prompt(self) -> ImagePromptParams:
        """redux_image or ip_adapter_image, whichever is sent (422 for both)."""
        return image_prompt_params(self)

    def lora_refs(self) -> list[tuple[str, float | None]]:
        extra = [(self.extra_lora, self.extra_lora_scale)] if self.extra_lora else []
        return super().lora_refs() + extra

    def sizing(self) -> tuple[bool, int | None]:
        """Without aspect_ratio or an image, the output takes the control image's size."""
        if self.control_image is not None and self.aspect_ratio is None and self.image is None:
            return True, 0
        return True, None

    def field_of(self, arg: str) -> str:
        if arg not in ("width", "height"):
            return super().field_of(arg)
        if self.image is not None:
            return "image"
        _, size_from = self.sizing()
        return "aspect_ratio" if size_from is None else "control_image"


_FURTHER = ("input_image_2", "input_image_3", "input_image_4")


class KontextInput(_ReduxInputs, VariationFields):
    """black-forest-labs/flux-kontext-dev's inputs (with flux-kontext-dev-lora's LoRA
    inputs): `input_image` is the reference the prompt edits, and `input_image_2` to `_4`
    (as flux-kontext-max names them) further references it reads; multi-image-kontext's
    `input_image_1` may stand for `input_image`; on a model with FLUX.1 Redux,
    `redux_image` an image prompt; `variation_seed` and `variation_strength` in
    text-to-image (no input image); unset values take the served model's defaults."""

    prompt: str = Field(min_length=1, max_length=4000, description=(
        "Text description of what you want to generate, or the instruction on how to edit "
        "the given image"))
    input_image: str | None = Field(None, description=(
        "Image to use as reference, as a data URI, base64 or an allowed URL; unset: "
        "text-to-image"))
    input_image_1: str | None = Field(None, description=(
        "The image to edit, under flux-kontext-apps/multi-image-kontext's name: the same as "
        "input_image (send one of the two)"))
    input_image_2: str | None = Field(None, description=(
        "A further reference image the edit of input_image reads (an object, a person, a "
        "style the prompt puts into it), as input_image takes it; at the output's area in "
        "its own shape"))
    input_image_3: str | None = Field(None, description="Another, as input_image_2")
    input_image_4: str | None = Field(None, description="Another, as input_image_2")
    aspect_ratio: Literal[("match_input_image", *KONTEXT_SIZES)] = Field(
        "match_input_image", description=(
            "Aspect ratio of the output; match_input_image: the input image's, at the "
            "model's default area (no image: the model's default size). Another ratio "
            "crops the input image to it"))
    safety_tolerance: int | None = Field(None, ge=0, le=6, description=(
        "Accepted, without effect (the moderation level flux-kontext-pro, -max and "
        "multi-image-kontext take); here the model's safety checker and "
        "disable_safety_checker decide"))

    mask: ClassVar[None] = None
    prompt_strength: ClassVar[float] = 1.0  # unused: a reference is not noised

    @field_validator("input_image_1")
    @classmethod
    def _one_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("input_image") is not None:
            raise ValueError("send the image to edit as input_image or input_image_1, not both")
        return value

    @property
    def image(self) -> str | None:
        return self.input_image if self.input_image is not None else self.input_image_1

    def request_args(self) -> dict[str, Any]:
        width, height = KONTEXT_SIZES.get(self.aspect_ratio, (None, None))
        return {"width": width, "height": height, **self.variation_args(), **self.call_args()}

    def references(self) -> list[str]:
        return [value for name in _FURTHER if (value := getattr(self, name)) is not None]

    def field_of(self, arg: str) -> str:
        edited = "input_image_1" if self.input_image_1 is not None else "input_image"
        if arg in ("width", "height"):
            return edited if self.aspect_ratio == "match_input_image" else "aspect_ratio"
        if arg.startswith(REFERENCES):  # the i-th of those given; the list itself: the first
            given = [name for name in _FURTHER if getattr(self, name) is not None]
            index = int(arg.split(".")[1]) if "." in arg else 0
            return given[min(index, len(given) - 1)]
        return super().field_of(edited if arg == "image" else arg)


# flux-fill-dev's and flux-canny-dev's megapixels: the output's area at the input image's
# shape; match_input, the input's size, shrunk to the model's limits as Replicate shrinks
# it into 1440².
FILL_AREAS = {"1": 1024 * 1024, "0.25": 512 * 512, "match_input": INPUT_AREA}


class _MegapixelInput(_ReduxInputs):
    """The inputs flux-fill-dev and flux-canny-dev share: the output's area at the input
    image's shape, and no prompt strength (every step runs)."""

    prompt: str = Field(min_length=1, max_length=4000, description="Prompt for generated image")
    megapixels: Literal[tuple(FILL_AREAS)] = Field("1", description=(
        "Approximate megapixels of the output, at the input image's shape; match_input: its "
        "size (each side a multiple of 16), shrunk to the model's limits if over them"))
    num_outputs: int = Field(1, ge=1, le=4, description="Number of outputs to generate")
    guidance: float | None = Field(None, ge=0, le=50, description=(
        "Guidance for generated image (these models are run at 30)"))

    prompt_strength: ClassVar[float] = 1.0  # unused: every step runs
    image_field: ClassVar[str] = "image"  # the input that holds the image

    def request_args(self) -> dict[str, Any]:
        return {"width": None, "height": None, "num_outputs": self.num_outputs,
                **self.call_args()}

    def source_area(self) -> int | None:
        return FILL_AREAS[self.megapixels]

    def field_of(self, arg: str) -> str:
        if arg in ("width", "height"):
            return "megapixels" if self.megapixels != "match_input" else self.image_field
        return super().field_of(self.image_field if arg == "image" else arg)


class FillInput(_MegapixelInput, MaskedAreaFields):
    """black-forest-labs/flux-fill-dev's inputs: the image to fill and the mask of the part
    to draw anew (or the image's own transparent part), with flux-fill-pro's outpainting
    presets, and the masked area alone drawn at `megapixels` with `padding_mask_crop`;
    unset values take the served model's defaults."""

    image: str = Field(description=(
        "The image to inpaint, as a data URI, base64 or an allowed URL. Can contain an alpha "
        "mask: without a mask, its transparent part is filled"))
    mask: str | None = Field(None, description=(
        "A black-and-white image of the image's size: white areas are inpainted, black "
        "kept; optional with an alpha mask in the image"))
    outpaint: Literal[("None", *OUTPAINT_PRESETS)] = Field("None", description=(
        "As flux-fill-pro's: set the image on a larger canvas first and draw the border "
        "too: zoomed out 1.5x or 2x (centred), made square, or half its size added on one "
        "side"))

    def outpainting(self) -> str | None:
        return None if self.outpaint == "None" else self.outpaint


class CannyInput(CannyEdgeInputs, _MegapixelInput):
    """black-forest-labs/flux-canny-dev's inputs: the control image whose Canny edges the
    output follows, with the thresholds of Black Forest Labs' Canny API; unset values take
    the served model's defaults."""

    control_image: str = Field(description=(
        "Image whose Canny edges (found here) the output follows, as a data URI, base64 or "
        "an allowed URL"))

    mask: ClassVar[None] = None
    image_field: ClassVar[str] = "control_image"

    @property
    def image(self) -> str:
        return self.control_image


class DepthInput(_MegapixelInput):
    """black-forest-labs/flux-depth-dev's inputs: the control image whose depth map
    (estimated here) lays out the output; unset values take the served model's defaults."""

    control_image: str = Field(description=(
        "Image whose depth map (estimated here) the output follows, as a data URI, base64 "
        "or an allowed URL"))

    mask: ClassVar[None] = None
    image_field: ClassVar[str] = "control_image"

    @property
    def image(self) -> str:
        return self.control_image
