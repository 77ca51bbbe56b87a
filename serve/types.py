"""The one internal request type every public API converts to, and what comes back.

Deployments see only these types; they know nothing about HTTP or the public APIs.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import Literal

from serve.adapters import AdapterSet
from serve.config import FAMILIES, SCHEDULERS, Family, LimitsConfig, ModelConfig
from serve.errors import ContentFlagged, InvalidField
from serve.request_images import (
    IMAGE_PROMPT_SIDE,
    MOST_PROMPT_PICTURES,
    ControlImage,
    ImagePrompt,
    IPAdapterBlocks,
    Picture,
    Reference,
    SourceImage,
)
from serve.request_limits import check_for_model, check_limits, upscaler_for

__all__ = ["IMAGE_PROMPT_SIDE", "MOST_PROMPT_PICTURES", "SCHEDULERS", "BatchInfo", "ControlImage",
           "GenerationRequest", "GenerationResult", "IPAdapterBlocks", "ImagePrompt", "Picture",
           "Reference", "SourceImage"]
OutputFormat = Literal["png", "webp", "jpeg"]
# Replicate's SDXL `refine` values: the refiner finishes the base model's last
# 1 - high_noise_frac of the steps, or reworks its finished image (img2img at strength 0.3).
Refine = Literal["no_refiner", "expert_ensemble_refiner", "base_image_refiner"]
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class GenerationRequest:
    """One client request, already resolved to a served model id and a concrete seed.

    Image i of the request is drawn from seed `seed + i` (mod 2**32), whatever batch it
    runs in.
    """

    model: str
    prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scheduler: str
    negative_prompt: str = ""
    num_outputs: int = 1
    output_format: OutputFormat = "png"
    output_quality: int = 90
    adapters: AdapterSet = field(default_factory=AdapterSet)
    request_id: str = ""
    source: SourceImage | None = None
    controls: tuple[ControlImage, ...] = ()  # ControlNets steering the image, combined
    image_prompt: ImagePrompt | None = None  # for the model's IP-Adapter or Redux
    # SDXL: image prompts for the model's further IP-Adapters (`ip_adapter.extra`), by name.
    extra_image_prompts: tuple[tuple[str, ImagePrompt], ...] = ()
    refine: Refine = "no_refiner"
    high_noise_frac: float = 0.8  # expert_ensemble_refiner: where the refiner takes over
    refine_steps: int | None = None  # base_image_refiner: steps (default: the request's)
    partial_images: int = 0  # images of the call in progress to send while it denoises
    client: str = ""  # the name of the API key it came with, for usage by key
    safety_check: bool = True  # False: skip the model's safety checker, if it lets requests
    watermark: bool = True  # False: leave out the model's invisible watermark, if it lets
    guidance_rescale: float = 0.0  # SDXL: rescale guided predictions to the prompt's spread
    priority: int = 0  # its API key's: a replica runs waiting requests of higher ones first
    tiling: bool = False  # SDXL: an image whose edges meet seamlessly when tiled
    # SDXL, FLUX: above 1, each image is upscaled by this much and redrawn by an img2img
    # pass at hires_strength over hires_steps (default: the request's), as the WebUI's
    # hires. fix; its sides are rounded to multiples of hires_multiple (the family's).
    hires_scale: float = 1.0
    hires_strength: float = 0.5
    hires_steps: int | None = None
    hires_upscaler: str = ""  # with a hires pass: BICUBIC or one of the model's upscalers
    hires_multiple: int = 8
    # SDXL, FLUX: above 1, each finished image is enlarged this much by `upscaler` (BICUBIC
    # or one of the model's upscalers), not redrawn, as the WebUI's Extras tab does; at 1
    # or below with an upscaler, it goes through it and is resized (`enlarges`).
    upscale: float = 1.0
    upscaler: str = ""
    # SDXL text-to-image: image i starts from its seed's noise moved towards that of
    # variation_seed + i by variation_strength (0: none), as the WebUI's variation seed.
    variation_seed: int | None = None
    variation_strength: float = 0.0
    # SDXL: the prompt is read that many layers before the text encoders' penultimate one.
    clip_skip: int = 0

    @property
    def mode(self) -> str:
        """txt2img, img2img or inpaint: which pipeline call the request needs (with its
        `controls`, that mode's ControlNet pipeline)."""
        return "txt2img" if self.source is None else self.source.mode

    @classmethod
    def for_model(cls, model: ModelConfig, prompt: str, *, width: int | None = None,
                  height: int | None = None, num_inference_steps: int | None = None,
                  guidance_scale: float | None = None, seed: int | None = None,
                  scheduler: str | None = None, guidance_rescale: float | None = None,
                  style: str | None = None, clip_skip: int | None = None,
                  hires_upscaler: str | None = None, upscaler: str | None = None,
                  through_upscaler: bool = False, **rest) -> GenerationRequest:
        """A request for `model`: unset values take its defaults, an unset seed is drawn,
        the prompts take the named `style`, and the result is checked against its limits
        (raises InvalidField). With `through_upscaler`, the images go through the upscaler
        even at `upscale` 1 or below (real-esrgan's `scale`: the network's output resized
        to it). The safety check and the watermark stay on where the model
        does not let requests skip them."""
        d = model.defaults
        # 1. The style's prompts, and the checks the model does not let requests skip.
        prompt = _styled(model, style, prompt, rest)
        if model.safety_checker is not None and not model.safety_checker.allow_disable:
            rest["safety_check"] = True
        if model.watermark is not None and not model.watermark.allow_disable:
            rest["watermark"] = True
        # 2. The request, with the model's defaults for what is unset.
        request = cls(
            model=model.id, prompt=prompt, width=width or d.width, height=height or d.height,
            num_inference_steps=num_inference_steps or d.num_inference_steps,
            guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
            seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed,
            scheduler=scheduler or model.default_scheduler,
            guidance_rescale=d.guidance_rescale if guidance_rescale is None else guidance_rescale,
            clip_skip=model.prompts.clip_skip if clip_skip is None else clip_skip,
            hires_upscaler=upscaler_for(model, hires_upscaler, rest.get("hires_scale", 1)),
            hires_multiple=model.rules.size_multiple,
            upscaler=upscaler_for(model, upscaler, rest.get("upscale", 1), "upscaler",
                                  through_upscaler), **rest)
        if model.inpainting:
            request = request.repainting()
        # 3. Checked against the model's limits and parts.
        check_for_model(request, model)
        return request

    def repainting(self) -> GenerationRequest:
        """The request as an inpainting UNet's call (its only kind): without a mask, the
        whole image repainted at its strength; text-to-image, a blank image repainted
        whole (at strength 1 the pipeline starts from pure noise, as text-to-image does)."""
        source, area = self.source, self.width * self.height
        if source is None:
            return replace(self, source=SourceImage.blank(self.width, self.height, "inpaint"))
        if source.mask is None:
            return replace(self, source=replace(source, mask=b"\xff" * area))
        return self

    @property
    def runs_no_step(self) -> bool:
        """Whether its strength is too low for any denoising step: its input image is
        the answer (enlarged, with `upscale`)."""
        return (self.source is not None
                and int(self.num_inference_steps * self.source.strength) < 1)

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_outputs)]

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the images delivered: with a hires pass, the request's size
        scaled, to the nearest multiple of `hires_multiple`; inpainting only the masked
        area, the whole input image's."""
        if self.source is not None and self.source.overlay is not None:  # the whole image
            return self.source.overlay.width, self.source.overlay.height
        if self.hires_scale == 1:
            return self.width, self.height
        step = self.hires_multiple
        return (round(self.width * self.hires_scale / step) * step,
                round(self.height * self.hires_scale / step) * step)

    @property
    def enlarges(self) -> bool:
        """Whether its finished images go through an upscaler (`upscale`, `upscaler`)."""
        return self.upscale != 1 or bool(self.upscaler)

    @property
    def delivered_size(self) -> tuple[int, int]:
        """(width, height) of the images answered: `output_size`, enlarged by `upscale`
        (rounded to whole pixels)."""
        width, height = self.output_size
        return round(width * self.upscale), round(height * self.upscale)

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call."""
        return (*self.shared_key, self.adapters.key)

    @property
    def shared_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call that gives each request
        its own adapter set (LoRA slots)."""
        return (self.guidance_scale, self.guidance_rescale, *self.any_guidance_key)

    @property
    def any_guidance_key(self) -> tuple:
        """`shared_key` with only whether the request is guided (a scale over 1) for its
        guidance scale and rescale: requests with equal keys can share a call that also
        gives each request its own scale and rescale (SDXL's)."""
        strength = None if self.source is None else self.source.strength
        refine = (self.refine, self.high_noise_frac, self.refine_steps)
        control = tuple(c.key for c in self.controls)
        # A Kontext edit's further references add tokens of their sizes to every row.
        refs = () if self.source is None else tuple((r.width, r.height)
                                                    for r in self.source.references)
        return (self.width, self.height, self.num_inference_steps, self.guidance_scale > 1,
                self.scheduler, self.mode, strength, refine, control,
                refs, self.tiling, self.hires_scale, self.hires_strength, self.hires_steps,
                self.hires_upscaler, self.masks_image_prompts)

    def check_masked_prompts(self) -> None:
        """Masked image prompts read each picture's attention apart: a request with one
        sends no mood board (422 on the board's field)."""
        if not self.masks_image_prompts:
            return
        for name, prompt in self._ip_adapter_prompts:
            if prompt.more:
                raise InvalidField(name, "a request with a masked image prompt sends single "
                                         "pictures, not mood boards")

    @property
    def masks_image_prompts(self) -> bool:
        """Whether an image prompt of the request has a mask (calls with masks read each
        picture's attention apart, as diffusers' masked IP-Adapter attention does)."""
        return any(prompt.mask is not None for _, prompt in self._ip_adapter_prompts)

    @property
    def _ip_adapter_prompts(self) -> list[tuple[str, ImagePrompt]]:
        """The request's image prompts, each with the field that sent it."""
        first = [] if self.image_prompt is None else [("ip_adapter_image", self.image_prompt)]
        return first + [("extra_ip_adapters", p) for _, p in self.extra_image_prompts]

    def check_limits(self, limits: LimitsConfig, family: Family = FAMILIES["sdxl"]) -> None:
        """Raise InvalidField for the first value outside the model's limits or what its
        pipeline family accepts (`serve.request_limits`)."""
        check_limits(self, limits, family)


def _styled(model: ModelConfig, style: str | None, prompt: str, rest: dict) -> str:
    """The prompt with the named `style` of `model` applied (its negative prompt set in
    `rest`); 422 on `style` for a name the model does not have."""
    if style is None:
        return prompt
    if style not in model.styles:
        raise InvalidField("style", f"one of {', '.join(model.styles)}" if model.styles
                           else "this model has no styles (its config sets none)")
    prompt, negative = model.styles[style].apply(prompt, rest.get("negative_prompt", ""))
    if negative:
        rest["negative_prompt"] = negative
    return prompt


@dataclass(frozen=True)
class BatchInfo:
    """How the pipeline call that produced a request's images was formed."""

    batch_id: str
    images: int
    requests: int
    queue_ms: float
    inference_ms: float


@dataclass(frozen=True)
class GenerationResult:
    """Encoded images of one request, in order, with the seed of each."""

    images: list[bytes]
    seeds: list[int]
    media_type: str
    width: int
    height: int
    batch: BatchInfo
    replica: str
    adapters_held: tuple[str, ...] = ()
    node: str = ""  # the Ray node id of the replica
    gpus: tuple[str, ...] = ()  # the GPU ids Ray gave the replica
    gc_ms: float = 0.0  # garbage collection in the replica's process while it held it
    # Per image: flagged by the model's safety checker (and then black). Empty: unchecked.
    nsfw: tuple[bool, ...] = ()
    notes: tuple[str, ...] = ()  # what of the request was not used (a prompt cut short)

    def unflagged(self) -> GenerationResult:
        """The result without its flagged images (as Replicate's models answer); raises
        ContentFlagged if that leaves none."""
        if not any(self.nsfw):
            return self
        kept = [i for i, flagged in enumerate(self.nsfw) if not flagged]
        if not kept:
            raise ContentFlagged()
        return replace(self, images=[self.images[i] for i in kept],
                       seeds=[self.seeds[i] for i in kept], nsfw=(False,) * len(kept))
