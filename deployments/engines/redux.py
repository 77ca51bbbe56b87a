"""FLUX.1 Redux: image prompts for a FLUX model.

Black Forest Labs' Redux encodes a picture with SigLIP and projects each of its patch
tokens to the width of the transformer's text tokens (diffusers' FluxPriorReduxPipeline:
image_encoder, feature_extractor, image_embedder). The tokens are appended to the prompt's
T5 tokens, as the reference code appends them (the prompt's own, an empty one when the
request has none), so the transformer reads the picture as more prompt. Each request's
tokens are made ahead of its call and stacked per row like any prompt; a call's rows must
then have the same number of tokens, so requests with an image prompt batch apart from
those without. The pictures encoded most recently are kept. An image prompt's scale is
not used: the transformer normalises each token, so scaled tokens draw nearly the same.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxPriorReduxPipeline
from PIL import Image

from deployments.engines.image_prompts import HeldEmbeds
from serve.types import ImagePrompt


class Redux:
    """The Redux of `folder` (a FluxPriorReduxPipeline folder), on `device` in `dtype`,
    for a transformer whose text tokens are `text_width` wide."""

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device,
                 text_width: int, entries: int = 32):
        prior = FluxPriorReduxPipeline.from_pretrained(folder, dtype=dtype,
                                                       local_files_only=True)
        width = prior.image_embedder.config.txt_in_features
        if width != text_width:
            raise ValueError(f"the Redux at {folder} makes tokens {width} wide, the model's "
                             f"transformer reads text tokens {text_width} wide: it is not "
                             "this model's Redux")
        self.encoder = prior.image_encoder.to(device).eval()
        self.embedder = prior.image_embedder.to(device).eval()
        self.processor = prior.feature_extractor
        self.device, self.dtype = device, dtype
        self._held = HeldEmbeds(entries)

    @torch.inference_mode()
    def tokens(self, prompt: ImagePrompt) -> torch.Tensor:
        """The picture's tokens (1, tokens, text width), made ahead of its call (from any
        thread), or those made for the same picture recently."""
        return self._held.get(prompt, self._encode)

    def _encode(self, picture: Image.Image) -> torch.Tensor:
        pixels = self.processor.preprocess(images=picture, do_resize=True, return_tensors="pt",
                                           do_convert_rgb=True).pixel_values
        hidden = self.encoder(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
        return self.embedder(hidden).image_embeds

    def appended(self, embeds: tuple[torch.Tensor, torch.Tensor],
                 prompt: ImagePrompt) -> tuple[torch.Tensor, torch.Tensor]:
        """A request's prompt embeddings (T5 tokens, pooled CLIP) with its picture's tokens
        after the T5 ones."""
        text, pooled = embeds
        return torch.cat([text, self.tokens(prompt).to(text.dtype)], dim=1), pooled
