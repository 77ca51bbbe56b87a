"""The fields `POST /generate` takes (query parameters or a JSON body), checked, and the
internal request they make (`GenerateParams.to_request`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.adapters import AdapterSet
from serve.canvases import OUTPAINT_PRESETS
from serve.config import ModelConfig
from serve.controls import ControlParams, ControlRef, listed
from serve.errors import InvalidField
from serve.model_parts import MOST_REFERENCES
from serve.option_fields import (
    MOOD_BOARD,
    REDUX_BOARD,
    ClipSkipFields,
    ExtraIPAdapterFields,
    HiresFields,
    MaskedAreaFields,
    PromptPictures,
    UpscaleFields,
    VariationFields,
)
from serve.types import (
    MAX_SEED,
    SCHEDULERS,
    ControlImage,
    GenerationRequest,
    ImagePrompt,
    OutputFormat,
    Refine,
    SourceImage,
)


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=2048, description=(
        "A name from GET /v1/loras, or a LoRA file's URL on a host in lora_allowed_hosts."))
    scale: float | None = Field(None, ge=-4, le=4, description="Default: the adapter's own.")


class OutpaintSides(BaseModel):
    model_config = ConfigDict(extra="forbid")

    left: int = Field(0, ge=0, le=4096, description="Pixels added on the left.")
    top: int = Field(0, ge=0, le=4096, description="Pixels added on the top.")
    right: int = Field(0, ge=0, le=4096, description="Pixels added on the right.")
    bottom: int = Field(0, ge=0, le=4096, description="Pixels added on the bottom.")


class GenerateParams(ClipSkipFields, HiresFields, UpscaleFields, VariationFields,
                     MaskedAreaFields, ExtraIPAdapterFields):
    """Everything `/generate` accepts; unset values take the model's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", max_length=4000, description=(
        "What to draw; required, except with a redux_image (a variation of it alone)."))
    model: str | None = Field(None, description="Model id or alias; default: the first served.")
    negative_prompt: str = Field("", max_length=4000, description="What to steer away from.")
    style: str | None = Field(None, max_length=100, description=(
        "One of the model's styles (GET /v1/models lists them): its template around the "
        "prompt, its negative prompt before this one."))
    width: int | None = Field(None, ge=8, description="Multiple of 8 (16 for flux), within limits.")
    height: int | None = Field(None, ge=8, description="Multiple of 8 (16 for flux), within limits.")
    steps: int | None = Field(None, ge=1, description="Denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="Classifier-free guidance.")
    guidance_rescale: float | None = Field(None, ge=0, le=1, description=(
        "SDXL: rescale each guided prediction to the spread of the prompt's own (0: none; "
        "about 0.7 for zero-terminal-SNR models); default: the model's."))
    tiling: bool = Field(False, description=(
        "SDXL: an image that tiles, its left edge continuing its right and its top its "
        "bottom (textures, patterns)."))
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random when absent; returned.")
    num_outputs: int = Field(1, ge=1, le=16, description="Images to make (seeds seed, seed+1, ...).")
    scheduler: str | None = Field(None, description=(
        f"SDXL: one of {', '.join(SCHEDULERS)}; FLUX: FlowMatchEuler."))
    output_format: OutputFormat = Field("png", description="png, webp or jpeg.")
    output_quality: int = Field(90, ge=1, le=100, description="webp/jpeg quality.")
    loras: list[LoraRef] = Field(default_factory=list, description=(
        "LoRA adapters to stack (JSON body only); `<lora:name:scale>` in the prompt also works."))
    image: str | None = Field(None, description=(
        "Input image for img2img (JSON body only): a data URI, base64, or an http(s) URL on "
        "a host in image_allowed_hosts. The output takes its size, rounded down to "
        "multiples of 8 (16 for flux), unless width or height are given. Its transparent "
        "part, if any, is inpainted. On a Kontext model a reference to edit, on a Fill "
        "model the image to fill, on a Canny model the picture whose edges are followed."))
    reference_images: list[str] = Field(default_factory=list, max_length=MOST_REFERENCES - 1,
                                        description=(
        "Kontext models: further reference images the edit of `image` reads (JSON body "
        "only; as image), e.g. an object or a style the prompt puts into it; each at the "
        "output's area in its own shape. At most the model's limits.max_references, the "
        "edited image included (default 4); not with a mask."))
    mask: str | None = Field(None, description=(
        "Inpainting mask of the image's size (JSON body only): white is repainted, black "
        "kept; a mask with transparency repaints its transparent part."))
    prompt_strength: float = Field(0.8, ge=0, le=1, description=(
        "How far an input image may change: 0 returns it, 1 keeps only its layout's trace."))
    refine: Refine = Field("no_refiner", description=(
        "SDXL models with a refiner: expert_ensemble_refiner (the refiner takes the last "
        "steps over) or base_image_refiner (it reworks the finished image)."))
    high_noise_frac: float = Field(0.8, gt=0, lt=1, description=(
        "expert_ensemble_refiner: the fraction of the steps the base model runs."))
    refine_steps: int | None = Field(None, ge=1, description=(
        "base_image_refiner: the refiner's steps (default: steps)."))
    control_image: str | None = Field(None, description=(
        "Models with ControlNets (SDXL, plain FLUX): the image whose shapes the output "
        "follows (JSON body only; a data URI, base64, or an allowed URL): the map itself "
        "(edges, depth, pose), or a picture for a ControlNet that preprocesses (canny). The "
        "output takes its size unless width or height, or an input image, are given."))
    controlnet: str | None = Field(None, description=(
        "Which of the model's ControlNets (GET /v1/models lists them); default: the first."))
    controlnet_conditioning_scale: float | None = Field(None, ge=0, le=4, description=(
        "How strongly the control image steers; default: the ControlNet's own (config)."))
    control_guidance_start: float = Field(0.0, ge=0, lt=1, description=(
        "The fraction of the steps after which the control image starts to steer."))
    control_guidance_end: float = Field(1.0, gt=0, le=1, description=(
        "The fraction of the steps after which it stops."))
    controlnets: list[ControlRef] = Field(default_factory=list, description=(
        "Several ControlNets at once (JSON body only), each with its control image; "
        "instead of control_image and controlnet."))
    ip_adapter_image: PromptPictures | None = Field(None, description=(
        "Models with an IP-Adapter: an image prompt, a picture whose content and style "
        "the output takes on beside the text prompt (JSON body only; a data URI, base64, or "
        "an allowed URL; any size). " + MOOD_BOARD))
    ip_adapter_scale: float | None = Field(None, ge=0, le=2, description=(
        "How strongly the image prompt steers (0 ignores it); default: the adapter's own "
        "(config)."))
    outpaint: OutpaintSides | Literal[tuple(OUTPAINT_PRESETS)] | None = Field(
        None, description=(
            "FLUX.1 Fill models and SDXL inpainting checkpoints (JSON body): set the image "
            "on a larger canvas first and draw the border too (at strength 1): pixels per "
            "side ({left, top, right, bottom}), or one of flux-fill-pro's presets (Zoom out "
            "1.5x, Zoom out 2x, Make square, Left / Right / Top / Bottom outpaint). The "
            "output takes the canvas's size unless width or height are given."))
    canny_low_threshold: int | None = Field(None, ge=0, le=500, description=(
        "FLUX.1 Canny models and canny ControlNets: gradients under it are never edges "
        "(OpenCV's Canny; default 50 for FLUX.1 Canny, as Black Forest Labs' API, 100 for "
        "ControlNets, as their training images)."))
    canny_high_threshold: int | None = Field(None, ge=0, le=500, description=(
        "Gradients over it are always edges, those between the two where they join one "
        "(default 200); higher thresholds find fewer edges."))
    redux_image: PromptPictures | None = Field(None, description=(
        "FLUX models with FLUX.1 Redux: an image prompt, a picture the output is a "
        "variation of, restyled by the prompt if one is given (JSON body only; a data URI, "
        "base64, or an allowed URL; any size). " + REDUX_BOARD))
    redux_downsampling: int | None = Field(None, ge=1, le=9, description=(
        "How far redux_image's grid of tokens is averaged down: 1 keeps all 729, 3 leaves "
        "81, which weigh less against the prompt; default: the model's Redux's own."))
    disable_safety_checker: bool = Field(False, description=(
        "Skip the model's safety checker, if it has one and lets requests skip it."))
    apply_watermark: bool = Field(True, description=(
        "Mark the images with the model's invisible watermark; false leaves it out where the "
        "model's config lets requests do so."))

    def outpaint_sides(self) -> tuple[int, int, int, int] | str | None:
        """The outpainting asked for: a preset's name, or pixels per side."""
        if isinstance(self.outpaint, OutpaintSides):
            o = self.outpaint
            return o.left, o.top, o.right, o.bottom
        return self.outpaint

    def control_params(self) -> list[ControlParams]:
        """The request's ControlNets; 422 when it gives them in both forms."""
        single = self.control_image is not None or self.controlnet is not None
        if single and self.controlnets:
            raise InvalidField("controlnets", "give either controlnets or control_image "
                                              "(with controlnet), not both")
        if single:
            return [ControlParams(self.control_image, self.controlnet,
                                  self.controlnet_conditioning_scale,
                                  self.control_guidance_start, self.control_guidance_end)]
        return listed(self.controlnets)

    def to_request(self, model: ModelConfig, request_id: str, prompt: str, adapters: AdapterSet,
                   source: SourceImage | None, width: int | None,
                   height: int | None, client: str = "",
                   controls: tuple[ControlImage, ...] = (),
                   image_prompt: ImagePrompt | None = None,
                   extra_image_prompts: tuple[tuple[str, ImagePrompt], ...] = (),
                   priority: int = 0) -> GenerationRequest:
        """Raises InvalidField for values outside the model's limits. `source`, `controls`,
        `width` and `height` come from `load_source` and `load_controls` (the input or
        first control image's size unless given), `image_prompt` and
        `extra_image_prompts` from `load_image_prompt` and `load_extra_image_prompts`."""
        return GenerationRequest.for_model(
            model, prompt, width=width, height=height, source=source, controls=controls,
            image_prompt=image_prompt, extra_image_prompts=extra_image_prompts,
            num_inference_steps=self.steps, guidance_scale=self.guidance_scale, seed=self.seed,
            guidance_rescale=self.guidance_rescale, tiling=self.tiling, clip_skip=self.clip_skip,
            **self.hires_args(), **self.upscale_args(), **self.variation_args(),
            scheduler=self.scheduler, negative_prompt=self.negative_prompt, style=self.style,
            num_outputs=self.num_outputs, output_format=self.output_format,
            output_quality=self.output_quality, adapters=adapters, request_id=request_id,
            refine=self.refine, high_noise_frac=self.high_noise_frac,
            refine_steps=self.refine_steps, client=client, priority=priority,
            safety_check=not self.disable_safety_checker, watermark=self.apply_watermark)
