"""The checks a request passes before it is queued: the model's limits, what its
pipeline family accepts and the parts (refiner, ControlNets, IP-Adapters, upscalers) its
config names. Each failure names the field (InvalidField: a 422 or 400 in the API's
shape)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from serve.errors import InvalidField
from serve.model_extras import BICUBIC
from serve.model_parts import Family, LimitsConfig

if TYPE_CHECKING:
    from serve.model_config import ModelConfig
    from serve.types import GenerationRequest

REFINER_STRENGTH = 0.3  # base_image_refiner: the refiner's img2img runs int(steps x 0.3)


def check_for_model(request: GenerationRequest, model: ModelConfig) -> None:
    """Raise InvalidField for the first thing `request` asks that `model` cannot do: its
    limits (`check_limits`), a refiner, ControlNets, IP-Adapters or Redux it lacks."""
    if request.refine != "no_refiner" and model.refiner is None:
        raise InvalidField("refine", "this model has no refiner (its config sets none); "
                                     "use no_refiner")
    request.check_limits(model.limits, model.rules)
    for control in request.controls:  # the routes name their own fields first
        if control.name not in model.controlnets:
            raise unknown_controlnet(model, control.name)
    if request.image_prompt is not None and (model.ip_adapter or model.redux) is None:
        raise InvalidField(model.image_prompt_field, "this model reads no image prompts "
                                                     "(its config sets no IP-Adapter or Redux)")
    for name, _ in request.extra_image_prompts:
        if name not in model.extra_ip_adapters:
            raise unknown_ip_adapter(model, name)
    request.check_masked_prompts()
    if len(request.controls) > model.limits.max_controlnets:
        raise InvalidField("controlnets", f"at most {model.limits.max_controlnets} "
                                          "ControlNets per request for this model")


def check_resizable(width: int, height: int, model: ModelConfig) -> None:
    """422 on `width` for a size past any image `model` draws or passes through, before an
    input image is resized to it: the request's own checks come once its images are read,
    and a resize to a size far past them would take the memory it names."""
    limits = model.limits
    if width * height > max(limits.max_pixels, limits.max_image_pixels):
        raise InvalidField("width", f"width x height must be at most {limits.max_pixels} "
                                    f"pixels, got {width * height}")


def check_limits(request: GenerationRequest, limits: LimitsConfig, family: Family) -> None:
    """Raise InvalidField for the first value outside the model's limits or what its
    pipeline family accepts."""
    if request.mode not in family.modes:
        raise InvalidField("image" if request.source is None else "mask",
                           family.needs or "this model does not do inpainting")
    if request.runs_no_step:  # nothing is drawn: the input's size is the answer's
        _check_passed_through(request, limits)
    else:
        _check_size(request, limits, family)
    if request.num_inference_steps > limits.max_steps:
        raise InvalidField("num_inference_steps",
                           f"must be at most {limits.max_steps} for this model")
    _check_refine(request, limits)
    if request.scheduler not in family.schedulers:
        raise InvalidField("scheduler", f"must be one of {', '.join(family.schedulers)}")
    if request.negative_prompt and not family.negative_prompt:
        raise InvalidField("negative_prompt", "this model takes no negative prompt")
    if request.clip_skip and not family.clip_skip:
        raise InvalidField("clip_skip", "FLUX reads its prompt with T5 and CLIP's pooled "
                                        "output: it has no CLIP layer to choose")
    _check_guidance_rescale(request, family)
    _check_hires(request, limits, family)
    _check_upscale(request, limits, family)
    _check_variation(request, family)
    if request.tiling and not family.tiles:
        raise InvalidField("tiling", "this model cannot draw tiling images (FLUX's "
                                     "transformer has no convolutions to wrap around)")


def _check_size(request: GenerationRequest, limits: LimitsConfig, family: Family) -> None:
    for name in ("width", "height"):
        value = getattr(request, name)
        if value % family.size_multiple:
            raise InvalidField(
                name, f"must be a multiple of {family.size_multiple}, got {value}")
        if not limits.min_size <= value <= limits.max_size:
            raise InvalidField(
                name, f"must be between {limits.min_size} and {limits.max_size}, got {value}")
    if request.width * request.height > limits.max_pixels:
        raise InvalidField("width", f"width x height must be at most {limits.max_pixels} "
                                    f"pixels, got {request.width * request.height}")
    if request.num_outputs > limits.max_outputs:
        raise InvalidField("num_outputs", f"must be at most {limits.max_outputs} for this model")
    if request.width * request.height * request.num_outputs > limits.max_request_pixels:
        raise InvalidField("num_outputs", (
            f"width x height x num_outputs must be at most {limits.max_request_pixels} "
            f"pixels for this model (its memory budget), got "
            f"{request.width * request.height * request.num_outputs}"))


def _check_passed_through(request: GenerationRequest, limits: LimitsConfig) -> None:
    """An input answered as it is (no step runs) is bounded by the largest image the
    model reads, not by what it draws."""
    if request.width * request.height > limits.max_image_pixels:
        raise InvalidField("image", f"is {request.width}x{request.height}, over this "
                                    f"model's {limits.max_image_pixels} pixels")
    if request.num_outputs > limits.max_outputs:
        raise InvalidField("num_outputs", f"must be at most {limits.max_outputs} for this model")


def _check_refine(request: GenerationRequest, limits: LimitsConfig) -> None:
    if request.refine == "base_image_refiner":
        steps = request.refine_steps or request.num_inference_steps
        if steps > limits.max_steps:
            raise InvalidField("refine_steps",
                               f"must be at most {limits.max_steps} for this model")
        if int(steps * REFINER_STRENGTH) < 1:
            raise InvalidField("refine_steps", (
                f"base_image_refiner reworks the image at strength {REFINER_STRENGTH}, "
                f"which needs at least {math.ceil(1 / REFINER_STRENGTH)} steps "
                "(refine_steps, or num_inference_steps when unset)"))
    if request.refine == "expert_ensemble_refiner" and not 0 < request.high_noise_frac < 1:
        raise InvalidField("high_noise_frac", "must be between 0 and 1 (exclusive) for "
                                              "expert_ensemble_refiner")


def _check_hires(request: GenerationRequest, limits: LimitsConfig, family: Family) -> None:
    if request.hires_scale == 1:
        return
    if not family.hires:
        raise InvalidField("hires_scale", "this model draws no second pass (SDXL "
                                          "and plain FLUX models do)")
    if request.source is not None or request.refine != "no_refiner":
        raise InvalidField("hires_scale", (
            "a hires pass follows text-to-image: not with an input image or refine (on an "
            "inpainting model every request has an image)"))
    width, height = request.output_size
    if max(width, height) > limits.max_size or width * height > limits.max_pixels:
        raise InvalidField("hires_scale", (
            f"the images would be {width}x{height}; this model draws at most "
            f"{limits.max_size} a side and {limits.max_pixels} pixels"))
    if width * height * request.num_outputs > limits.max_request_pixels:
        raise InvalidField("num_outputs", (
            f"{request.num_outputs} images of {width}x{height} exceed this model's "
            f"{limits.max_request_pixels} pixels per request (its memory budget)"))
    steps = request.hires_steps or request.num_inference_steps
    if steps > limits.max_steps:
        raise InvalidField("hires_steps", f"must be at most {limits.max_steps} for this "
                                          "model")
    if int(steps * request.hires_strength) < 1:
        raise InvalidField("hires_strength", (
            f"runs int(steps x strength) steps: {steps} x {request.hires_strength} is none"))


def _check_upscale(request: GenerationRequest, limits: LimitsConfig, family: Family) -> None:
    if not request.enlarges:
        return
    if not family.hires:
        raise InvalidField("upscale", "this model enlarges no images (SDXL and plain FLUX "
                                      "models do, not the FLUX.1 tools)")
    if request.source is not None and request.source.overlay is not None:
        raise InvalidField("upscale", "not with padding_mask_crop (the answer is the whole "
                                      "input image)")
    width, height = request.delivered_size
    if min(width, height) < 1:
        raise InvalidField("upscale", f"the images would be {width}x{height} pixels")
    if width * height > limits.max_image_pixels:
        raise InvalidField("upscale", (
            f"the images would be {width}x{height}, over this model's "
            f"{limits.max_image_pixels} pixels (max_image_pixels)"))


def _check_variation(request: GenerationRequest, family: Family) -> None:
    if not request.variation_strength:
        return
    if not family.variations:
        raise InvalidField("variation_strength", "this model draws no seed variations "
                                                 "(SDXL, FLUX and Kontext models do)")
    if request.source is not None:
        raise InvalidField("variation_strength", (
            "a variation moves text-to-image's starting noise: not with an input image (on "
            "an inpainting model every request has one)"))
    if request.variation_seed is None:
        raise InvalidField("variation_seed", "needed with a variation_strength")


def _check_guidance_rescale(request: GenerationRequest, family: Family) -> None:
    if not request.guidance_rescale:
        return
    if not family.negative_prompt:  # the families with a negative prompt guide with it
        raise InvalidField("guidance_rescale", "this model runs no classifier-free "
                                               "guidance to rescale")


def upscaler_for(model: ModelConfig, name: str | None, scale: float,
              field: str = "hires_upscaler", always: bool = False) -> str:
    """The upscaler a request's hires pass (or its final `upscale`) uses: the one named
    (BICUBIC or one of the model's), else the model's first, else BICUBIC; none at scale
    1 unless `always`."""
    if name is not None and name != BICUBIC and name not in model.upscalers:
        raise InvalidField(field, "one of " + ", ".join([BICUBIC, *model.upscalers]))
    if scale == 1 and not always:
        return ""
    return name or next(iter(model.upscalers), BICUBIC)


def unknown_controlnet(model: ModelConfig, name: str, field: str = "controlnets") -> InvalidField:
    names = ", ".join(model.controlnets) or "none (its config sets none)"
    return InvalidField(field, f"this model has no ControlNet named {name!r}; its "
                               f"ControlNets: {names}")


def unknown_ip_adapter(model: ModelConfig, name: str,
                       field: str = "extra_ip_adapters") -> InvalidField:
    names = ", ".join(model.extra_ip_adapters) or "it has none"
    return InvalidField(field, f"{name!r} is not one of this model's further IP-Adapters "
                               f"({names})")
