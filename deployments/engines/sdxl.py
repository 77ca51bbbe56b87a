"""SDXL engine: text-to-image, img2img and inpainting with the seven Replicate schedulers
and LoRA slots in the UNet."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from deployments.adapters import adapter_store
from deployments.engines.base import DiffusersEngine
from deployments.engines.prompts import Embeds
from serve.adapters import AdapterEntry
from serve.config import SpeedConfig
from serve.model_parts import FAMILIES
from serve.types import GenerationRequest

# Replicate's names → (diffusers class, extra config).
_SCHEDULERS = {
    "K_EULER": (EulerDiscreteScheduler, {}),
    "K_EULER_ANCESTRAL": (EulerAncestralDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
    "DPMSolverMultistep": (DPMSolverMultistepScheduler, {}),
    "HeunDiscrete": (HeunDiscreteScheduler, {}),
    "KarrasDPM": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
}


class SDXLEngine(DiffusersEngine):
    """Loads an SDXL pipeline from local files only and runs compatible batches."""

    pipelines: ClassVar[dict[str, type]] = {"txt2img": StableDiffusionXLPipeline,
                 "img2img": StableDiffusionXLImg2ImgPipeline,
                 "inpaint": StableDiffusionXLInpaintPipeline}
    denoiser = "unet"
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    embed_names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                   "negative_pooled_prompt_embeds")

    def __init__(self, path: Path, dtype: str, device: str, variant: str | None = None,
                 adapters: Mapping[str, AdapterEntry] | None = None, max_adapters: int = 8,
                 max_lora_rank: int = 64,
                 lora_targets: Sequence[str] = FAMILIES["sdxl"].lora_targets,
                 simulate_oom_above_images: int | None = None,
                 speed: SpeedConfig | None = None, compile_cache: Path | None = None,
                 fuse_adapters: bool = False):
        super().__init__(path, dtype, device, variant, simulate_oom_above_images)
        base = self.pipe.scheduler.config
        self._schedulers = {name: cls.from_config(base, **extra)
                            for name, (cls, extra) in _SCHEDULERS.items()}
        self.adapters = adapter_store(self.pipe.unet, adapters, max_adapters,
                                      max_lora_rank, lora_targets, fuse=fuse_adapters)
        self.speed_up(speed or SpeedConfig(), compile_cache or path / ".compile")

    def _prepare(self, first: GenerationRequest):
        pipe = super()._prepare(first)
        pipe.scheduler = self._schedulers[first.scheduler]
        return pipe

    def _encode_prompt(self, prompt: str, negative_prompt: str) -> Embeds:
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompt, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negative_prompt or None)
        return pos, neg, pooled, neg_pooled
