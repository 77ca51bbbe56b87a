"""An SDXL model's IP-Adapter: image prompts encoded before their call, and given to the
UNet per row, so that requests with and without one, and with different scales, share a
call.

diffusers' IP-Adapter attention adds `scale x attention(image tokens)` to each
cross-attention, one scale for the whole call. Here the adapter's scale stays 1 (0 for
calls where no request has an image prompt: the attention is skipped), and each row's own
scale multiplies the values of its image attention, which scales its output by as much
(attention is linear in its values): a row without an image prompt adds exactly nothing.
The UNet's inputs for the image tokens are made at each of its calls for the rows still in
the batch, as the step callback cannot reach them. The pictures encoded most recently are
kept (a brand's few mood boards come back again and again), so a repeated one skips the
image encoder.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection
from PIL import Image

from deployments.engines.withdrawal import BatchRows
from serve.types import GenerationRequest, ImagePrompt


class HeldEmbeds:
    """The embeddings of the pictures encoded most recently, by picture: a repeated image
    prompt skips its encoder. Safe from any thread."""

    def __init__(self, entries: int = 32):
        self._held: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._entries, self._lock = entries, threading.Lock()

    def get(self, prompt: ImagePrompt,
            encode: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
        """The picture's embedding: the one held, or `encode`'s, then held."""
        key = (hashlib.sha256(prompt.rgb).digest(), prompt.width, prompt.height)
        with self._lock:
            if key in self._held:
                self._held.move_to_end(key)
                return self._held[key]
        embed = encode(Image.frombytes("RGB", (prompt.width, prompt.height), prompt.rgb))
        with self._lock:
            self._held[key] = embed
            if len(self._held) > self._entries:
                self._held.popitem(last=False)
        return embed


class ImagePrompts:
    """The IP-Adapter loaded into `pipe` (its UNet's attention and image projection, its
    image encoder and feature extractor), from `folder` as diffusers' load_ip_adapter reads
    one."""

    def __init__(self, pipe, folder: Path, subfolder: str, weight_name: str,
                 image_encoder: str, entries: int = 32):
        pipe.load_ip_adapter(str(folder), subfolder=subfolder, weight_name=weight_name,
                             image_encoder_folder=image_encoder, local_files_only=True)
        pipe.image_encoder.eval()
        self.pipe, self.unet = pipe, pipe.unet
        projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        # Plus adapters read the encoder's penultimate hidden states, the others its embedding.
        self.hidden_states = not isinstance(projection, ImageProjection)
        self.attention = [p for p in pipe.unet.attn_processors.values()
                          if isinstance(p, IPAdapterAttnProcessor2_0)]
        self._row_scales: torch.Tensor | None = None  # of the UNet call in progress
        for processor in self.attention:
            for values in processor.to_v_ip:
                values.register_forward_hook(self._scale_rows)
        # diffusers' unconditional image prompt: zeros, or the encoder's view of a black image.
        blank = Image.new("RGB", (8, 8))
        self.unconditional = self._encode(blank)[1]
        self._held = HeldEmbeds(entries)

    def _encode(self, picture: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pipe.encode_image(picture, self.unet.device, 1, self.hidden_states)

    @torch.inference_mode()
    def embed(self, prompt: ImagePrompt | None) -> torch.Tensor | None:
        """The image prompt's embedding for the UNet (one image's), made ahead of its call
        (from any thread), or the one made for the same picture recently."""
        if prompt is None:
            return None
        return self._held.get(prompt, lambda picture: self._encode(picture)[0])

    def _scale_rows(self, module, args, values: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (values.ndim - 1)  # rows first: (rows, images, tokens, dim)
        return values * self._row_scales.to(values.dtype).view(shape)

    @contextmanager
    def following(self, requests: Sequence[GenerationRequest],
                  embeds: Sequence[torch.Tensor | None], rows: BatchRows) -> Iterator[None]:
        """Around a call: each UNet call gets the image tokens' inputs and scales of the
        rows still live, both guidance halves (the unconditional one with diffusers'
        unconditional image prompt) or the conditional one alone."""
        scales, cond = [], []
        for request, embed in zip(requests, embeds, strict=True):
            prompt = request.image_prompt
            scales += [0.0 if prompt is None else prompt.scale] * request.num_outputs
            cond += [self.unconditional if embed is None else embed] * request.num_outputs
        per_row = torch.tensor(scales, device=self.unet.device)
        cond_rows = torch.cat(cond)[:, None]  # one image per row
        self.pipe.set_ip_adapter_scale(1.0 if any(scales) else 0.0)

        def image_inputs(module, args, kwargs):
            count = (args[0] if args else kwargs["sample"]).shape[0]
            live = torch.tensor(rows.original_rows(), device=per_row.device)
            embeds, row_scales = cond_rows[live], per_row[live]
            if count == 2 * len(live):
                embeds = torch.cat([self.unconditional[None].expand_as(embeds), embeds])
                row_scales = row_scales.repeat(2)
            self._row_scales = row_scales
            added = dict(kwargs.get("added_cond_kwargs") or {}, image_embeds=[embeds])
            return args, kwargs | {"added_cond_kwargs": added}

        hook = self.unet.register_forward_pre_hook(image_inputs, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()
            self._row_scales = None
