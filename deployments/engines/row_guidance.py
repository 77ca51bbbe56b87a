"""Requests with different guidance scales in one call (SDXL's and FLUX's).

diffusers' SDXL pipelines (text-to-image, img2img, inpainting, their ControlNet versions
and the refiner's) take one guidance scale per call, and mix each step's two UNet halves
as `uncond + scale * (text - uncond)`. `RowGuidance` stands in for that scale when a
call's requests ask for different ones: it compares and converts as the first request's
scale (a call's rows are all guided, over 1, or none is), and multiplied with a tensor of
the call's live image rows it gives each row its own request's scale. Each product is
the one the scalar gives: the float32 product of the row and the scale, rounded once to
the row's dtype (PyTorch multiplies a half-precision tensor by a Python float in float32
the same way), so an image is what it would be in a call of its own scale.

The rows it reads are the call's `BatchRows`: when withdrawn requests leave the batch,
the scales of the rows left follow. Pipelines that turn the scale into a tensor for a
guidance embedding cannot take it: FLUX's engine gives its transformer (and its
ControlNets) each live row's scale instead (`per_image`), and LCM-distilled UNets keep
requests of different scales apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import torch

from deployments.engines.withdrawal import BatchRows


class RowGuidance(float):
    """The guidance scale of a call whose requests' scales differ."""

    scales: tuple[float, ...]
    rows: BatchRows

    def __new__(cls, scales: Sequence[float], rows: BatchRows) -> Self:
        if len(scales) != len(rows.sizes):
            raise ValueError(f"{len(scales)} guidance scales for {len(rows.sizes)} requests")
        if len({scale > 1 for scale in scales}) > 1:
            raise ValueError("a call's requests are all guided (scale over 1) or none is")
        made = super().__new__(cls, scales[0])
        made.scales, made.rows = tuple(scales), rows
        return made

    def __mul__(self, other):
        if not torch.is_tensor(other):
            return float(self) * other
        scales = per_image(self.scales, self.rows)
        if other.shape[0] != len(scales):
            raise ValueError(f"a tensor of {other.shape[0]} rows guided as "
                             f"{len(scales)} image rows")
        factor = torch.tensor(scales, dtype=torch.float32, device=other.device)
        factor = factor.view(-1, *(1,) * (other.dim() - 1))
        return (other.float() * factor).to(other.dtype)

    __rmul__ = __mul__


def per_image(scales: Sequence[float], rows: BatchRows) -> list[float]:
    """The scale of each live image row, in row order, from each request's `scales`."""
    return [scales[i] for i in rows.live for _ in range(rows.sizes[i])]


def call_guidance(scales: Sequence[float], rows: BatchRows) -> float:
    """The guidance scale to give a pipeline call of requests with `scales`: a plain float
    where they agree, else a RowGuidance over the call's `rows`."""
    if len(set(scales)) == 1:
        return float(scales[0])
    return RowGuidance(scales, rows)
