"""The image safety checker: Stable Diffusion's NSFW classifier (a CLIP vision model and
concept embeddings), run on each output image before it is encoded."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

class _OwnAnswer(logging.Filter):
    """The checker warns that "a black image will be returned instead": here the
    withheld images are the APIs' to answer for, and logged once by the replica."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Potential NSFW content was detected" not in record.getMessage()


logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker").addFilter(_OwnAnswer())


class SafetyChecker:
    """Loaded from a local folder onto the model's device, in its dtype; `flags` may run
    on any thread (no state changes). (torch is imported where used: the ingress imports
    the deployments.)"""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype):
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
        from transformers import CLIPImageProcessor

        self.device, self.dtype = device, dtype
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = StableDiffusionSafetyChecker.from_pretrained(
            path, dtype=dtype, local_files_only=True, use_safetensors=True).to(device).eval()

    def flags(self, images: Sequence[Image.Image]) -> list[bool]:
        """Whether each image shows one of the checker's concepts."""
        import torch

        if not images:
            return []
        pixels = self.processor(list(images), return_tensors="pt").pixel_values
        with torch.inference_mode():
            # `images` is only blacked out by the checker where flagged: stand-ins will do.
            _, flagged = self.model(clip_input=pixels.to(self.device, self.dtype),
                                    images=[np.zeros(1) for _ in images])
        return [bool(f) for f in flagged]

    def warm_up(self, width: int, height: int) -> None:
        """One check, so that the first request's does not allocate."""
        self.flags([Image.new("RGB", (width, height))])


def withheld(image: Image.Image) -> Image.Image:
    """What a flagged image becomes: black, of its size."""
    return Image.new("RGB", image.size)
