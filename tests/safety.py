"""A tiny image safety checker (Stable Diffusion's architecture, random CLIP weights) whose
concepts are set so that it flags given images and passes others, saved as a
CompVis/stable-diffusion-safety-checker folder is."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def tinted_noise(seed: int, tint: tuple[int, int, int]) -> Image.Image:
    """64x64 noise around a colour, different for each seed."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(tint) + rng.normal(0, 40, (64, 64, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def save_checker(folder: Path, flagged: list[Image.Image], kept: list[Image.Image]) -> None:
    """Every concept is the direction from the mean embedding of `kept` to that of
    `flagged`, with the threshold halfway between the two groups' cosines: images like
    `flagged` score above it, images like `kept` below. Raises if the random model cannot
    tell the groups apart by a clear margin."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(7)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                   crop_size={"height": 32, "width": 32})

    def embeds(images):
        pixels = processor(images, return_tensors="pt").pixel_values
        with torch.no_grad():
            out = checker.visual_projection(checker.vision_model(pixels)[1])
        return torch.nn.functional.normalize(out, dim=-1)

    bad, good = embeds(flagged), embeds(kept)
    concept = torch.nn.functional.normalize(bad.mean(0) - good.mean(0), dim=0)
    low, high = (good @ concept).max().item(), (bad @ concept).min().item()
    if high - low < 0.02:  # the checker rounds its scores to 3 decimals
        raise ValueError(f"the groups are too close to tell apart ({low:.3f}, {high:.3f})")
    with torch.no_grad():
        checker.concept_embeds.copy_(concept.expand_as(checker.concept_embeds))
        checker.concept_embeds_weights.fill_((low + high) / 2)
        checker.special_care_embeds_weights.fill_(2.0)  # above any cosine: never
    checker.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
