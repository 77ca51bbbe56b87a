"""A model's IP-Adapter (SDXL's, or XLabs' for FLUX): image prompts encoded before their
call, and given to the denoiser per row, so that requests with and without one, and with
different scales, share a call. An SDXL model may hold several adapters of one folder and
image encoder (a style adapter and a face one, say): a request's image prompt goes to the
first, and its further ones (`extra_image_prompts`) to the others by name.

diffusers' IP-Adapter attention adds `scale x attention(image tokens)` to each
cross-attention (FLUX: to each double-stream block), one scale for the whole call. Here
the adapter's scale stays 1 (for SDXL, 0 for calls where no request has an image prompt:
the attention is skipped), and each row's own scale multiplies the values of its image
attention, which scales its output by as much (attention is linear in its values): a row
without an image prompt adds exactly nothing, and a row steering only some blocks
(InstantStyle's) has its scale in those and 0 in the others. The denoiser's inputs for the
image tokens
are made at each of its calls for the rows still in the batch, as the step callback cannot
reach them. The pictures encoded most recently are
kept (a brand's few mood boards come back again and again), so a repeated one skips the
image encoder.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
from PIL import Image

from deployments.engines.image_prompt_rows import RowMasks, block_kinds, by_block_kind
from deployments.engines.withdrawal import BatchRows
from serve.steering import encoder_folder
from serve.types import GenerationRequest, ImagePrompt, Picture


class HeldEmbeds:
    """The embeddings of the pictures encoded most recently, by picture: a repeated image
    prompt skips its encoder. Safe from any thread."""

    def __init__(self, entries: int = 32):
        self._held: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._entries, self._lock = entries, threading.Lock()

    def get(self, picture: Picture, encode: Callable[[Image.Image], torch.Tensor],
            kind: object = None) -> torch.Tensor:
        """The picture's embedding (of `kind`, where an encoder gives several): the one
        held, or `encode`'s, then held."""
        key = (hashlib.sha256(picture.rgb).digest(), picture.width, picture.height, kind)
        with self._lock:
            if key in self._held:
                self._held.move_to_end(key)
                return self._held[key]
        embed = encode(Image.frombytes("RGB", (picture.width, picture.height), picture.rgb))
        with self._lock:
            self._held[key] = embed
            if len(self._held) > self._entries:
                self._held.popitem(last=False)
        return embed


class ImagePrompts:
    """The IP-Adapters loaded into an SDXL `pipe` (its UNet's attention and image
    projections, its image encoder and feature extractor), from `folder` as diffusers'
    load_ip_adapter reads them: `weights` is the first's file, or (name, file) pairs, the
    first's name "" (a request's `image_prompt`), the others' those its
    `extra_image_prompts` give."""

    processor: type = IPAdapterAttnProcessor2_0  # the attention the adapters bring

    def __init__(self, pipe, folder: Path, subfolder: str,
                 weights: str | Sequence[tuple[str, str]], image_encoder: str,
                 entries: int = 32):
        self.pipe = pipe
        pairs = [("", weights)] if isinstance(weights, str) else list(weights)
        self.names = [name for name, _ in pairs]
        self._load(folder, subfolder, [file for _, file in pairs], image_encoder)
        pipe.image_encoder.eval()
        # Of the denoiser call in progress: each adapter's scale of each row, in each kind
        # of block (`block_kinds`; None: the others).
        self._row_scales: list[dict[str | None, torch.Tensor]] | None = None
        kinds, self.attention = self._block_kinds(), []
        for name, processor in self.denoiser.attn_processors.items():
            if isinstance(processor, self.processor):
                self.attention.append(processor)
                kind = next((k for prefix, k in kinds.items() if name.startswith(prefix)), None)
                for adapter, values in enumerate(processor.to_v_ip):
                    values.register_forward_hook(partial(self._scale_rows, adapter, kind))
        self.unconditional = [self._unconditional(i) for i in range(len(pairs))]
        self._held = HeldEmbeds(entries)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def _load(self, folder: Path, subfolder: str, weight_names: list[str],
              image_encoder: str) -> None:
        count = len(weight_names)
        self.pipe.load_ip_adapter([str(folder)] * count, subfolder=[subfolder] * count,
                                  weight_name=weight_names, image_encoder_folder=image_encoder,
                                  local_files_only=True)
        # Plus adapters read the encoder's penultimate hidden states, the others its embedding.
        self.hidden = [not isinstance(projection, ImageProjection) for projection
                       in self.denoiser.encoder_hid_proj.image_projection_layers]

    def _block_kinds(self) -> dict[str, str]:
        return block_kinds(self.denoiser)

    @property
    def hidden_states(self) -> bool:
        """Whether the first adapter reads the encoder's hidden states."""
        return self.hidden[0]

    def _unconditional(self, adapter: int) -> torch.Tensor:
        """diffusers' unconditional image prompt: zeros, or the encoder's view of a black
        image."""
        return self._encode(Image.new("RGB", (8, 8)), adapter)[1]

    def _encode(self, picture: Image.Image, adapter: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pipe.encode_image(picture, self.denoiser.device, 1, self.hidden[adapter])

    @torch.inference_mode()
    def embed(self, prompt: ImagePrompt | None, adapter: int = 0) -> torch.Tensor | None:
        """The image prompt's embedding for the denoiser through adapter number
        `adapter`, one row per picture, made ahead of its call (from any thread); a picture
        encoded recently is not encoded again."""
        if prompt is None:
            return None
        embeds = [self._held.get(picture, lambda p: self._encode(p, adapter)[0],
                                 self.hidden[adapter]) for picture in prompt.pictures]
        return embeds[0] if len(embeds) == 1 else torch.cat(embeds)  # one: the held one

    def embeds(self, request: GenerationRequest) -> tuple[torch.Tensor | None, ...]:
        """The request's image prompts' embeddings, one per adapter (None: it sends that
        adapter none)."""
        extra = dict(request.extra_image_prompts)
        return tuple(self.embed(request.image_prompt if i == 0 else extra.get(name), i)
                     for i, name in enumerate(self.names))

    def _scale_rows(self, adapter: int, kind: str | None, module, args,
                    values: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (values.ndim - 1)  # rows first: (rows, images, tokens, dim)
        return values * self._row_scales[adapter][kind].to(values.dtype).view(shape)

    @contextmanager
    def following(self, requests: Sequence[GenerationRequest],
                  embeds: Sequence[tuple[torch.Tensor | None, ...]],
                  rows: BatchRows) -> Iterator[None]:
        """Around a call (`embeds`: each request's, one per adapter, from `embeds`): each
        denoiser call gets each adapter's image tokens' inputs and scales of the rows still
        live, both guidance halves (the unconditional one with diffusers' unconditional
        image prompt) or the conditional one alone."""
        per_row, cond_rows = zip(*(self._rows_of(requests, embeds, adapter)
                                   for adapter in range(len(self.names))), strict=True)
        self._set_scale([bool(scales.any()) for scales in per_row])
        # diffusers' unconditional prompt has one unconditional picture per picture.
        unconditional = [uncond.expand(cond.shape[1], *uncond.shape[1:]) for uncond, cond
                         in zip(self.unconditional, cond_rows, strict=True)]
        masks = RowMasks([self._masks_of(requests, adapter)
                          for adapter in range(len(self.names))])
        per_kind = [by_block_kind(scales, [self._blocks(r, adapter) for r in requests
                                           for _ in range(r.num_outputs)])
                    for adapter, scales in enumerate(per_row)]

        def image_inputs(module, args, kwargs):
            live = torch.tensor(rows.original_rows(), device=self.denoiser.device)
            embeds = [cond[live] for cond in cond_rows]
            row_scales = [{kind: s[live] for kind, s in kinds.items()} for kinds in per_kind]
            both = self._rows(args, kwargs) == 2 * len(live)
            if both:
                embeds = [torch.cat([uncond[None].expand_as(e), e])
                          for uncond, e in zip(unconditional, embeds, strict=True)]
                row_scales = [{kind: s.repeat(2) for kind, s in kinds.items()}
                              for kinds in row_scales]
            self._row_scales = row_scales
            kwargs = self._with_embeds(kwargs, embeds)
            if masks.any:
                size = [side * self.pipe.vae_scale_factor for side in self._latents(
                    args, kwargs).shape[-2:]]
                kwargs = self._with_masks(kwargs, masks.live(live, size, both))
            return args, kwargs

        hook = self.denoiser.register_forward_pre_hook(image_inputs, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()
            self._row_scales = None

    def _rows_of(self, requests: Sequence[GenerationRequest],
                 embeds: Sequence[tuple[torch.Tensor | None, ...]],
                 adapter: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An adapter's scale and image embeddings for each row of a call: 0 and the
        unconditional image prompt for rows that send it none. Rows whose prompts hold
        different numbers of pictures share the call: each row's pictures are repeated up
        to a count all the rows' counts divide, which leaves its attention exactly as it
        was (repeating every key and value of an attention as often changes no weight)."""
        scales, cond = [], []
        for request, made in zip(requests, embeds, strict=True):
            prompt, embed = self._prompt(request, adapter), made[adapter]
            scales += [0.0 if prompt is None else prompt.scale] * request.num_outputs
            cond += [self.unconditional[adapter] if embed is None else embed] * \
                request.num_outputs
        count = math.lcm(*(len(embed) for embed in cond))
        return (torch.tensor(scales, device=self.denoiser.device),
                torch.stack([embed.repeat_interleave(count // len(embed), dim=0)
                             for embed in cond]))  # (rows, pictures, ...)

    def _masks_of(self, requests: Sequence[GenerationRequest],
                  adapter: int) -> list[Picture | None] | None:
        """Each row's mask for an adapter (None: the whole image), or None where no row
        has one (the adapter's attention is then diffusers' unmasked one)."""
        masks = []
        for request in requests:
            prompt = self._prompt(request, adapter)
            masks += [None if prompt is None else prompt.mask] * request.num_outputs
        return masks if any(mask is not None for mask in masks) else None

    def _blocks(self, request: GenerationRequest, adapter: int) -> str:
        prompt = self._prompt(request, adapter)
        return "all" if prompt is None else prompt.blocks

    def _prompt(self, request: GenerationRequest, adapter: int) -> ImagePrompt | None:
        if adapter == 0:
            return request.image_prompt
        return dict(request.extra_image_prompts).get(self.names[adapter])

    def _set_scale(self, prompted: list[bool]) -> None:
        """Each adapter's own scale for a call: 1, or 0 where no row has an image prompt
        for it (the UNet then skips its attention)."""
        self.pipe.set_ip_adapter_scale([1.0 if p else 0.0 for p in prompted])

    @staticmethod
    def _latents(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["sample"]

    @classmethod
    def _rows(cls, args: tuple, kwargs: dict) -> int:
        return cls._latents(args, kwargs).shape[0]

    @staticmethod
    def _with_masks(kwargs: dict, masks: list[torch.Tensor | None]) -> dict:
        attention = dict(kwargs.get("cross_attention_kwargs") or {}, ip_adapter_masks=masks)
        return kwargs | {"cross_attention_kwargs": attention}

    @staticmethod
    def _with_embeds(kwargs: dict, embeds: list[torch.Tensor]) -> dict:
        added = dict(kwargs.get("added_cond_kwargs") or {}, image_embeds=embeds)
        return kwargs | {"added_cond_kwargs": added}


class FluxImagePrompts(ImagePrompts):
    """An XLabs IP-Adapter loaded into a FLUX `pipe` (XLabs-AI/flux-ip-adapter's layout, as
    diffusers' FluxIPAdapterMixin reads it): the picture's CLIP image embedding becomes
    tokens the transformer projects at each call, and each double-stream block adds an
    attention over them to its image stream. Every call of any of the model's pipelines
    gets the rows' embeddings here, from the transformer's forward pre-hook; FLUX has no
    guidance halves, and a row without an image prompt reads zeros at scale 0, which adds
    exactly nothing, so the adapter's own scale stays 1."""

    processor = FluxIPAdapterAttnProcessor

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def _load(self, folder: Path, subfolder: str, weight_names: list[str],
              image_encoder: str) -> None:
        (weight_name,) = weight_names  # one adapter (the model's config allows no more)
        self.hidden = [False]
        self.pipe.load_ip_adapter(
            str(folder), weight_name=weight_name, subfolder=subfolder,
            image_encoder_pretrained_model_name_or_path=str(
                encoder_folder(folder, subfolder, image_encoder)),
            image_encoder_dtype=self.denoiser.dtype, local_files_only=True)
        self.pipe.image_encoder.to(self.denoiser.device)

    def _unconditional(self, adapter: int) -> torch.Tensor:
        width = self.pipe.image_encoder.config.projection_dim
        return torch.zeros(1, width, device=self.denoiser.device, dtype=self.denoiser.dtype)

    def _encode(self, picture: Image.Image, adapter: int) -> tuple[torch.Tensor, None]:
        return self.pipe.encode_image(picture, self.denoiser.device, 1), None

    def _set_scale(self, prompted: list[bool]) -> None:
        pass

    def _block_kinds(self) -> dict[str, str]:
        return {}  # (requests name no blocks: they are SDXL's)

    @staticmethod
    def _rows(args: tuple, kwargs: dict) -> int:
        return kwargs["hidden_states"].shape[0]

    @staticmethod
    def _with_embeds(kwargs: dict, embeds: list[torch.Tensor]) -> dict:
        # A fresh dict: the transformer pops the embeddings from the one it is given.
        joint = dict(kwargs.get("joint_attention_kwargs") or {}, ip_adapter_image_embeds=embeds)
        return kwargs | {"joint_attention_kwargs": joint}
