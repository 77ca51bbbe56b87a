"""FLUX.1 Redux: image prompts for a FLUX model.

Black Forest Labs' Redux encodes a picture with SigLIP and projects each of its patch
tokens to the width of the transformer's text tokens (diffusers' FluxPriorReduxPipeline:
image_encoder, feature_extractor, image_embedder). The tokens are appended to the prompt's
T5 tokens, as the reference code appends them (the prompt's own, an empty one when the
request has none), so the transformer reads the picture as more prompt. Each request's
tokens are made ahead of its call and stacked per row like any prompt; a call's rows must
then have the same number of tokens, so requests batch by how many picture tokens they
have (none without an image prompt). The pictures encoded most recently are kept.

Redux's tokens form the encoder's grid of patches (27x27 for FLUX.1-Redux-dev's SigLIP).
A request's `downsampling` k averages the grid down to (side // k)² tokens (area
averaging, one of the modes of ComfyUI's and InvokeAI's Redux downsampling nodes), so the
picture weighs less against the prompt. Multiplying the tokens instead (diffusers'
prompt_embeds_scale) meets the transformer's normalisation of each token: on the tiny
model, doubling them moved no pixel by more than one level.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxPriorReduxPipeline
from PIL import Image

from deployments.engines.image_prompts import HeldEmbeds
from serve.types import ImagePrompt, Picture


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
        config = prior.image_encoder.config
        self.side = config.image_size // config.patch_size  # the grid of picture tokens
        self.device, self.dtype = device, dtype
        self._held = HeldEmbeds(entries)

    @torch.inference_mode()
    def tokens(self, picture: Picture) -> torch.Tensor:
        """The picture's tokens (1, tokens, text width), made ahead of its call (from any
        thread), or those made for the same picture recently."""
        return self._held.get(picture, self._encode)

    def _encode(self, picture: Image.Image) -> torch.Tensor:
        pixels = self.processor.preprocess(images=picture, do_resize=True, return_tensors="pt",
                                           do_convert_rgb=True).pixel_values
        hidden = self.encoder(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
        return self.embedder(hidden).image_embeds

    def count(self, downsampling: int) -> int:
        """How many tokens a picture gives at `downsampling`."""
        return max(1, self.side // downsampling) ** 2

    def appended(self, embeds: tuple[torch.Tensor, torch.Tensor],
                 prompt: ImagePrompt) -> tuple[torch.Tensor, torch.Tensor]:
        """A request's prompt embeddings (T5 tokens, pooled CLIP) with its pictures'
        tokens, each picture's averaged down by the prompt's `downsampling`, after the T5
        ones in the pictures' order (a mood board's, as chained Redux conditionings
        append theirs)."""
        text, pooled = embeds
        tokens = [self._downsampled(self.tokens(picture), prompt.downsampling).to(text.dtype)
                  for picture in prompt.pictures]
        return torch.cat([text, *tokens], dim=1), pooled

    def _downsampled(self, tokens: torch.Tensor, downsampling: int) -> torch.Tensor:
        if downsampling == 1:
            return tokens
        side, width = max(1, self.side // downsampling), tokens.shape[-1]
        grid = tokens.view(1, self.side, self.side, width).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(side, side), mode="area")
        return grid.permute(0, 2, 3, 1).reshape(1, side * side, width)
