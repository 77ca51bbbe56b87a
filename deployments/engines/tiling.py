"""Images that tile: every convolution of a call's models pads circularly (a request's
`tiling`), as AUTOMATIC1111's WebUI draws tiling textures. Each feature map then wraps
around at its edges, so the left edge continues the right one and the top the bottom, in
the latents and in the decoded pixels alike."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def circular_padding(models: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, the models' 2-D convolutions pad circularly; their own padding
    after it."""
    convs = [m for model in models for m in model.modules() if isinstance(m, nn.Conv2d)]
    before = [conv.padding_mode for conv in convs]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv, mode in zip(convs, before, strict=True):
            conv.padding_mode = mode


@contextmanager
def whole_vae(vae: nn.Module) -> Iterator[None]:
    """Within the block, the VAE decodes and encodes whole images, tiled or not by the
    model's `vae_tiling`: a tiling image's circular padding wraps the whole image, which
    tiles of it would break."""
    before = vae.use_tiling
    vae.use_tiling = False
    try:
        yield
    finally:
        vae.use_tiling = before


def resized(images: torch.Tensor, size: tuple[int, int], mode: str,
            wrap: bool = False) -> torch.Tensor:
    """`images` (N, C, H, W) resized to `size` (height, width) by `mode`; with `wrap`, as
    a tiling image is: each edge's neighbours are the opposite edge's pixels (the image is
    resized as the middle of its 3 x 3 tiling), so the result tiles too."""
    if not wrap:
        return nn.functional.interpolate(images, size=size, mode=mode)
    height, width = size
    tiled = images.repeat(1, 1, 3, 3)
    big = nn.functional.interpolate(tiled, size=(3 * height, 3 * width), mode=mode)
    return big[..., height:2 * height, width:2 * width]
