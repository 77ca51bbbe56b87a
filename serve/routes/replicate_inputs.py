"""Replicate model inputs: the LoRA inputs every model takes, and `stability-ai/sdxl`'s
with fofr/sdxl-multi-controlnet-lora's ControlNet inputs (FLUX's are in
`serve.routes.replicate_flux`; which model takes which, in `serve.routes.replicate_schemas`;
the create body and its headers, in `serve.routes.replicate_body`).

Each input class turns itself into the arguments of `GenerationRequest.for_model`
(`request_args`) and names, for an error about one of those arguments, its own field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from serve.controls import ControlParams, ImagePromptParams
from serve.errors import InvalidField
from serve.option_fields import (
    MOOD_BOARD,
    ClipSkipFields,
    ExtraIPAdapterFields,
    HiresFields,
    MaskedAreaFields,
    PromptPictures,
    UpscaleFields,
    VariationFields,
)
from serve.types import MAX_SEED, SCHEDULERS, OutputFormat, Refine


class ReplicateInputBase(BaseModel):
    """What every Replicate input tells the request built from it, as far as the model's
    own inputs leave it unset: no adapters, ControlNets, image prompt or further
    references; the sizes as given."""

    model_config = ConfigDict(extra="forbid")

    def lora_refs(self) -> list[tuple[str, float | None]]:
        return []

    def field_of(self, arg: str) -> str:
        """The input field that holds request argument `arg`."""
        return arg

    def control_params(self) -> list[ControlParams]:
        """The ControlNets the input asks for (SDXL's multi-ControlNet inputs)."""
        return []

    def sizing(self) -> tuple[bool, int | None]:
        """(whether width and height count, the index in `control_params` of the control
        image whose size the output takes, if one)."""
        return True, None

    def image_prompt(self) -> ImagePromptParams:
        """The image prompt the input sends for the model's IP-Adapter or Redux."""
        return ImagePromptParams(None)

    def extra_prompt_params(self) -> dict[str, tuple[str, float | None]]:
        """(picture, scale) of the image prompts it sends further IP-Adapters, by name."""
        return {}

    def references(self) -> list[str]:
        """Further reference images of a Kontext edit (flux-kontext-max's input_image_2 …)."""
        return []

    def source_area(self) -> int | None:
        """The output's area in pixels, at the input image's shape, if the input sets it
        (flux-fill-dev's megapixels)."""
        return None

    def outpainting(self) -> str | None:
        """The outpainting preset the input asks for (flux-fill-pro's `outpaint`), if one."""
        return None

    def edge_thresholds(self) -> tuple[int | None, int | None]:
        """The Canny thresholds (low, high) the input sets, if any."""
        return None, None


class LoraInput(ReplicateInputBase):
    """The LoRA inputs of Replicate's LoRA models: a catalog name or file URL, its scale."""

    lora_weights: str | None = Field(None, max_length=2048, description=(
        "A LoRA name from GET /v1/loras (Replicate model names, <owner>/<model>, are those "
        "of adapters filed under <owner>/ in a LoRA folder), or the URL of a .safetensors "
        "LoRA file on a host in lora_allowed_hosts"))
    lora_scale: float | None = Field(None, ge=-4, le=4, description="Scale of lora_weights")

    def lora_refs(self) -> list[tuple[str, float | None]]:
        return [(self.lora_weights, self.lora_scale)] if self.lora_weights else []

    def field_of(self, arg: str) -> str:
        return "lora_weights" if arg == "loras" else arg


class IPAdapterInputs(ExtraIPAdapterFields, LoraInput):
    """The IP-Adapter inputs of Replicate's SDXL models, for models with an IP-Adapter
    (SDXL's, or XLabs' on FLUX; others refuse them)."""

    ip_adapter_image: PromptPictures | None = Field(None, description=(
        "Image prompt for the model's IP-Adapter: its content and style steer the output "
        "beside the prompt; as image takes it. " + MOOD_BOARD))
    ip_adapter_scale: float | None = Field(None, ge=0, le=2, description=(
        "How strongly ip_adapter_image steers; default: the adapter's own"))

    def image_prompt(self) -> ImagePromptParams:
        return ImagePromptParams(self.ip_adapter_image, self.ip_adapter_scale,
                                 mask=self.ip_adapter_mask, blocks=self.ip_adapter_blocks)


class CannyEdgeInputs(BaseModel):
    """Canny's edge thresholds, for a FLUX.1 Canny model's control image (as Black Forest
    Labs' Canny API takes them) and for the pictures of canny ControlNets (an Atelier
    extension on the ControlNet models' inputs); a model that finds no edges refuses them."""

    canny_low_threshold: int | None = Field(None, ge=0, le=500, description=(
        "Gradients under it are never edges (OpenCV's Canny; default 50 for FLUX.1 Canny, as "
        "Black Forest Labs' API, 100 for canny ControlNets, as their training images)"))
    canny_high_threshold: int | None = Field(None, ge=0, le=500, description=(
        "Gradients over it are always edges, those between where they join one (default "
        "200); higher thresholds find fewer"))

    def edge_thresholds(self) -> tuple[int | None, int | None]:
        return self.canny_low_threshold, self.canny_high_threshold


_SIZINGS = ("width_height", "input_image", "mask_image", "controlnet_1_image",
            "controlnet_2_image", "controlnet_3_image")


def _controlnet_inputs() -> dict[str, Any]:
    """The inputs of fofr/sdxl-multi-controlnet-lora: three ControlNet slots, each a name
    (none: unused), a control image, a scale and the fractions of the steps it steers."""
    fields: dict[str, Any] = {}
    for n in (1, 2, 3):
        fields |= {
            f"controlnet_{n}": (str, Field("none", max_length=200, description=(
                f"ControlNet {n}: a name from the model's ControlNets (GET /v1/models), or "
                "none"))),
            f"controlnet_{n}_image": (str | None, Field(None, description=(
                f"Control image of ControlNet {n}, as image takes it"))),
            f"controlnet_{n}_conditioning_scale": (float | None, Field(None, ge=0, le=4,
                description="How strongly it steers; default: the ControlNet's own")),
            f"controlnet_{n}_start": (float, Field(0.0, ge=0, le=1, description=(
                "When it starts steering, as a fraction of the steps"))),
            f"controlnet_{n}_end": (float, Field(1.0, ge=0, le=1, description=(
                "When it stops steering, as a fraction of the steps")))}
    return fields


class _ControlNetSlots(CannyEdgeInputs):
    """The ControlNet slots' methods; `ControlNetInputs` adds their fields."""

    sizing_strategy: Literal[_SIZINGS] = Field("width_height", description=(
        "Where the output size comes from: width and height, the input image, or a "
        "ControlNet's control image"))

    def control_params(self) -> list[ControlParams]:
        return [ControlParams(getattr(self, f"controlnet_{n}_image"),
                              getattr(self, f"controlnet_{n}"),
                              getattr(self, f"controlnet_{n}_conditioning_scale"),
                              getattr(self, f"controlnet_{n}_start"),
                              getattr(self, f"controlnet_{n}_end"),
                              (f"controlnet_{n}", f"controlnet_{n}_image", f"controlnet_{n}_start"))
                for n in (1, 2, 3) if getattr(self, f"controlnet_{n}") != "none"]

    def sizing(self) -> tuple[bool, int | None]:
        strategy = self.sizing_strategy
        if strategy in ("input_image", "mask_image"):
            if getattr(self, "image", None) is None:
                raise InvalidField("sizing_strategy", f"{strategy} needs an image")
            return False, None
        if strategy == "width_height":
            return True, None
        slot = f"controlnet_{strategy.split('_')[1]}"
        names = [p.fields[0] for p in self.control_params()]
        if slot not in names:
            raise InvalidField("sizing_strategy", f"{strategy} needs {slot} to be set")
        return False, names.index(slot)


ControlNetInputs = create_model("ControlNetInputs", __base__=_ControlNetSlots,
                                 **_controlnet_inputs())


class SDXLInput(ControlNetInputs, IPAdapterInputs, ClipSkipFields, HiresFields,
                UpscaleFields, VariationFields, MaskedAreaFields):
    """stability-ai/sdxl's inputs, with fofr/sdxl-multi-controlnet-lora's ControlNet inputs
    for models with ControlNets; unset values take the served model's defaults."""

    prompt: str = Field(min_length=1, max_length=4000, description="Input prompt")
    negative_prompt: str = Field("", max_length=4000, description="Input negative prompt")
    width: int | None = Field(None, ge=8, description="Width of output image")
    height: int | None = Field(None, ge=8, description="Height of output image")
    num_outputs: int = Field(1, ge=1, le=4, description="Number of images to output")
    scheduler: str | None = Field(None, description=f"scheduler: {', '.join(SCHEDULERS)}")
    num_inference_steps: int | None = Field(None, ge=1, le=500, description="Denoising steps")
    guidance_scale: float | None = Field(None, ge=0, le=50, description=(
        "Classifier-free guidance; 1 or below: none (bytedance/sdxl-lightning-4step's 0)"))
    guidance_rescale: float | None = Field(None, ge=0, le=1, description=(
        "Rescale guided predictions to the prompt's own spread (0: none; about 0.7 for "
        "zero-terminal-SNR models); blank: the model's default"))
    style: str | None = Field(None, max_length=100, description=(
        "One of the model's styles (GET /v1/models lists them); blank: none"))
    tiling: bool = Field(False, description=(
        "An image that tiles, edge to edge both ways (textures, patterns)"))
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; blank: random")
    image: str | None = Field(None, description=(
        "Input image for img2img or inpaint mode, as a data URI (or base64)"))
    mask: str | None = Field(None, description=(
        "Input mask for inpaint mode: white areas are repainted, black kept"))
    prompt_strength: float = Field(0.8, ge=0, le=1, description=(
        "Prompt strength with img2img / inpaint; 1.0 destroys the input image's information"))
    output_format: OutputFormat = Field("png", description="png, webp or jpeg")
    output_quality: int = Field(90, ge=1, le=100, description="webp/jpeg quality")
    refine: Refine = Field("no_refiner", description=(
        "Which refine style to use (models whose config has a refiner)"))
    high_noise_frac: float = Field(0.8, ge=0, le=1, description=(
        "For expert_ensemble_refiner, the fraction of noise to use"))
    refine_steps: int | None = Field(None, ge=1, description=(
        "For base_image_refiner, the number of steps to refine, defaults to "
        "num_inference_steps"))
    replicate_weights: str | None = Field(None, description=(
        "Not taken: give lora_weights (a catalog name or a .safetensors URL) instead"))
    apply_watermark: bool = Field(True, description=(
        "Mark the images with SDXL's invisible watermark (models whose config lets requests "
        "leave it out)"))
    disable_safety_checker: bool = Field(False, description=(
        "Skip the model's safety checker (if it has one and lets requests skip it)"))
    @field_validator("replicate_weights")
    @classmethod
    def _no_trained_weights(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError("Replicate's trained-weights archives are not read here; give "
                             "lora_weights: a LoRA name from GET /v1/loras or the URL of its "
                             ".safetensors file")

    def request_args(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "num_outputs": self.num_outputs,
                "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "scheduler": self.scheduler,
                "guidance_rescale": self.guidance_rescale, "tiling": self.tiling,
                "clip_skip": self.clip_skip,
                "style": self.style,
                **self.hires_args(), **self.upscale_args(), **self.variation_args(),
                "negative_prompt": self.negative_prompt, "output_format": self.output_format,
                "output_quality": self.output_quality, "refine": self.refine,
                "high_noise_frac": self.high_noise_frac, "refine_steps": self.refine_steps,
                "watermark": self.apply_watermark}
