"""Replicate model inputs: those of `stability-ai/sdxl`, `black-forest-labs/flux-dev` and
`black-forest-labs/flux-kontext-dev` (the create body and its headers are in
`serve.routes.replicate_body`).

Each input class turns itself into the arguments of `GenerationRequest.for_model`
(`request_args`) and names, for an error about one of those arguments, its own field."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from serve.config import ModelConfig
from serve.controls import ControlParams
from serve.errors import InvalidField
from serve.types import MAX_SEED, SCHEDULERS, OutputFormat, Refine


class _LoraInput(BaseModel):
    """The LoRA inputs of Replicate's LoRA models: a catalog name or file URL, its scale."""

    model_config = ConfigDict(extra="forbid")

    lora_weights: str | None = Field(None, max_length=2048, description=(
        "A LoRA name from GET /v1/loras (Replicate model names, <owner>/<model>, are those "
        "of adapters filed under <owner>/ in a LoRA folder), or the URL of a .safetensors "
        "LoRA file on a host in lora_allowed_hosts"))
    lora_scale: float | None = Field(None, ge=-4, le=4, description="Scale of lora_weights")

    def lora_refs(self) -> list[tuple[str, float | None]]:
        return [(self.lora_weights, self.lora_scale)] if self.lora_weights else []

    def field_of(self, arg: str) -> str:
        """The input field that holds request argument `arg`."""
        return "lora_weights" if arg == "loras" else arg

    def control_params(self) -> list[ControlParams]:
        """The ControlNets the input asks for (SDXL's multi-ControlNet inputs)."""
        return []

    def sizing(self) -> tuple[bool, int | None]:
        """(whether width and height count, the index in `control_params` of the control
        image whose size the output takes, if one)."""
        return True, None

    def image_prompt(self) -> tuple[str | None, float | None]:
        """The image prompt the input sends for the model's IP-Adapter, and its scale."""
        return None, None


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


class _ControlNetSlots(BaseModel):
    """The ControlNet slots' methods; `_ControlNetInputs` adds their fields."""

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


_ControlNetInputs = create_model("_ControlNetInputs", __base__=_ControlNetSlots,
                                 **_controlnet_inputs())


class SDXLInput(_ControlNetInputs, _LoraInput):
    """stability-ai/sdxl's inputs, with fofr/sdxl-multi-controlnet-lora's ControlNet inputs
    for models with ControlNets; unset values take the served model's defaults."""

    prompt: str = Field(min_length=1, max_length=4000, description="Input prompt")
    negative_prompt: str = Field("", max_length=4000, description="Input negative prompt")
    width: int | None = Field(None, ge=8, description="Width of output image")
    height: int | None = Field(None, ge=8, description="Height of output image")
    num_outputs: int = Field(1, ge=1, le=4, description="Number of images to output")
    scheduler: str | None = Field(None, description=f"scheduler: {', '.join(SCHEDULERS)}")
    num_inference_steps: int | None = Field(None, ge=1, le=500, description="Denoising steps")
    guidance_scale: float | None = Field(None, ge=1, le=50, description="Classifier-free guidance")
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
    ip_adapter_image: str | None = Field(None, description=(
        "Image prompt for the model's IP-Adapter: its content and style steer the output "
        "beside the prompt; as image takes it"))
    ip_adapter_scale: float | None = Field(None, ge=0, le=2, description=(
        "How strongly ip_adapter_image steers; default: the adapter's own"))

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
                "negative_prompt": self.negative_prompt, "output_format": self.output_format,
                "output_quality": self.output_quality, "refine": self.refine,
                "high_noise_frac": self.high_noise_frac, "refine_steps": self.refine_steps,
                "watermark": self.apply_watermark}

    def image_prompt(self) -> tuple[str | None, float | None]:
        return self.ip_adapter_image, self.ip_adapter_scale


# Output sizes of FLUX at one megapixel per aspect ratio (multiples of 16); 0.25 MP halves
# each side.
FLUX_SIZES = {"1:1": (1024, 1024), "16:9": (1344, 768), "21:9": (1536, 640),
              "3:2": (1216, 832), "2:3": (832, 1216), "4:5": (896, 1088), "5:4": (1088, 896),
              "3:4": (896, 1152), "4:3": (1152, 896), "9:16": (768, 1344), "9:21": (640, 1536)}


class FluxInput(_LoraInput):
    """black-forest-labs/flux-dev's inputs, with the LoRA inputs of flux-dev-lora and the
    LoRA and mask inputs of Replicate's trained FLUX models (`extra_lora`, `mask`); unset
    values take the served model's defaults."""

    prompt: str = Field(min_length=1, max_length=4000, description="Prompt for generated image")
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
    num_inference_steps: int | None = Field(None, ge=1, le=50, description="Denoising steps")
    guidance: float | None = Field(None, ge=0, le=10, description="Guidance for the process")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; blank: random")
    output_format: Literal["webp", "jpg", "png"] = Field("webp", description="Image format")
    output_quality: int = Field(80, ge=0, le=100, description="webp/jpg quality")
    extra_lora: str | None = Field(None, description=(
        "A second LoRA (a name from GET /v1/loras or a file URL), stacked on "
        "lora_weights"))
    extra_lora_scale: float | None = Field(None, ge=-4, le=4, description=(
        "Scale of extra_lora"))
    go_fast: bool = Field(True, description="Accepted; the model's speed settings apply")
    disable_safety_checker: bool = Field(False, description=(
        "Skip the model's safety checker (if it has one and lets requests skip it)"))

    def request_args(self) -> dict[str, Any]:
        width = height = None
        if self.aspect_ratio is not None and self.image is None:
            width, height = FLUX_SIZES[self.aspect_ratio]
            if self.megapixels == "0.25":
                width, height = width // 2, height // 2
        return {"width": width, "height": height, "num_outputs": self.num_outputs,
                "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance, **_flux_output(self)}

    def lora_refs(self) -> list[tuple[str, float | None]]:
        extra = [(self.extra_lora, self.extra_lora_scale)] if self.extra_lora else []
        return super().lora_refs() + extra

    def field_of(self, arg: str) -> str:
        if arg in ("width", "height"):
            return "image" if self.image is not None else "aspect_ratio"
        return super().field_of({"guidance_scale": "guidance"}.get(arg, arg))


class KontextInput(_LoraInput):
    """black-forest-labs/flux-kontext-dev's inputs (with flux-kontext-dev-lora's LoRA
    inputs): `input_image` is the reference the prompt edits; unset values take the served
    model's defaults."""

    prompt: str = Field(min_length=1, max_length=4000, description=(
        "Text description of what you want to generate, or the instruction on how to edit "
        "the given image"))
    input_image: str | None = Field(None, description=(
        "Image to use as reference, as a data URI, base64 or an allowed URL; unset: "
        "text-to-image"))
    aspect_ratio: Literal[("match_input_image", *FLUX_SIZES)] = Field(
        "match_input_image", description=(
            "Aspect ratio of the output; match_input_image: the input image's, at the "
            "model's default area (no image: the model's default size). Another ratio "
            "crops the input image to it"))
    num_inference_steps: int | None = Field(None, ge=1, le=50, description="Denoising steps")
    guidance: float | None = Field(None, ge=0, le=10, description="Guidance for generation")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; blank: random")
    output_format: Literal["webp", "jpg", "png"] = Field("webp", description="Image format")
    output_quality: int = Field(80, ge=0, le=100, description="webp/jpg quality")
    go_fast: bool = Field(True, description="Accepted; the model's speed settings apply")
    disable_safety_checker: bool = Field(False, description=(
        "Skip the model's safety checker (if it has one and lets requests skip it)"))

    mask: ClassVar[None] = None
    prompt_strength: ClassVar[float] = 1.0  # unused: a reference is not noised

    @property
    def image(self) -> str | None:
        return self.input_image

    def request_args(self) -> dict[str, Any]:
        width, height = FLUX_SIZES.get(self.aspect_ratio, (None, None))
        return {"width": width, "height": height, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance, **_flux_output(self)}

    def field_of(self, arg: str) -> str:
        if arg in ("width", "height"):
            return "input_image" if self.aspect_ratio == "match_input_image" else "aspect_ratio"
        return super().field_of({"guidance_scale": "guidance",
                                 "image": "input_image"}.get(arg, arg))


def _flux_output(inp: FluxInput | KontextInput) -> dict[str, Any]:
    """The output format and quality of Replicate's FLUX inputs, as requests take them."""
    return {"output_format": "jpeg" if inp.output_format == "jpg" else inp.output_format,
            "output_quality": max(1, inp.output_quality)}


ReplicateInput = SDXLInput | FluxInput | KontextInput


def input_class(model: ModelConfig) -> type[ReplicateInput]:
    if model.kontext:
        return KontextInput
    return FluxInput if model.family == "flux" else SDXLInput


def single_output(model: ModelConfig) -> bool:
    """Whether the model's predictions output one file URL rather than a list, as
    flux-kontext-dev's (one image per prediction) do."""
    return model.kontext


def parse_input(model: ModelConfig, raw: dict) -> ReplicateInput:
    """The create body's `input`, validated against the model's inputs; a bad field is a
    422 located at input.<field>."""
    cls = input_class(model)
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", "input", *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors) from None


_IP_ADAPTER_INPUTS = ("ip_adapter_image", "ip_adapter_scale")


def input_schema(model: ModelConfig) -> dict:
    """The model's input schema; an SDXL model without ControlNets shows no ControlNet
    inputs, one without an IP-Adapter no image prompt inputs (it refuses them)."""
    schema = input_class(model).model_json_schema()
    hidden: set[str] = set()
    if model.family == "sdxl" and not model.controlnets:
        hidden |= set(_ControlNetInputs.model_fields)
    if model.family == "sdxl" and model.ip_adapter is None:
        hidden |= set(_IP_ADAPTER_INPUTS)
    schema["properties"] = {name: spec for name, spec in schema["properties"].items()
                            if name not in hidden}
    return schema
