"""Images that tile: every convolution of a call's models pads circularly (a request's
`tiling`), as AUTOMATIC1111's WebUI draws tiling textures. Each feature map then wraps
around at its edges, so the left edge continues the right one and the top the bottom, in
the latents and in the decoded pixels alike."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

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
