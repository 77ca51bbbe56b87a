"""Requests with different guidance scales and rescales in one call (SDXL's and FLUX's).

diffusers' SDXL pipelines (text-to-image, img2img, inpainting, their ControlNet versions
and the refiner's) take one guidance scale per call, and mix each step's two UNet halves
as `uncond + scale * (text - uncond)`. `RowGuidance` stands in for that scale when a
call's requests ask for different ones: it compares and converts as the first request's
scale (a call's rows are all guided, over 1, or none is), and multiplied with a tensor of
the call's live image rows it gives each row its own request's scale. Each product is
the one the scalar gives: the float32 product of the row and the scale, rounded once to
the row's dtype (PyTorch multiplies a half-precision tensor by a Python float in float32
the same way), so an image is what it would be in a call of its own scale.

The guidance rescale is one per call too, and diffusers mixes with it as
`rescale * rescaled + (1 - rescale) * guided`: a `RowFactor` of the call's rescales
multiplies each row by its own (and `1 - factor` is one too). It compares as the largest,
so the pipeline rescales when any row asks; a row of rescale 0 gets `0 * rescaled +
1 * guided`, its guided prediction unchanged.

The rows it reads are the call's `BatchRows`: when withdrawn requests leave the batch,
the factors of the rows left follow. Pipelines that turn the scale into a tensor for a
guidance embedding cannot take it: FLUX's engine gives its transformer (and its
ControlNets) each live row's scale instead (`per_image`), and LCM-distilled UNets keep
requests of different scales apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import torch

from deployments.engines.withdrawal import BatchRows


class RowFactor(float):
    """A factor of a call whose requests' values differ: a float of `value` (default:
    the first request's) that multiplies each image row of a tensor by its own request's."""

    scales: tuple[float, ...]
    rows: BatchRows

    def __new__(cls, scales: Sequence[float], rows: BatchRows,
                value: float | None = None) -> Self:
        if len(scales) != len(rows.sizes):
            raise ValueError(f"{len(scales)} values for {len(rows.sizes)} requests")
        made = super().__new__(cls, scales[0] if value is None else value)
        made.scales, made.rows = tuple(scales), rows
        return made

    def __mul__(self, other):
        if not torch.is_tensor(other):
            return float(self) * other
        scales = per_image(self.scales, self.rows)
        if other.shape[0] != len(scales):
            raise ValueError(f"a tensor of {other.shape[0]} rows multiplied as "
                             f"{len(scales)} image rows")
        factor = torch.tensor(scales, dtype=torch.float32, device=other.device)
        factor = factor.view(-1, *(1,) * (other.dim() - 1))
        return (other.float() * factor).to(other.dtype)

    __rmul__ = __mul__

    def __rsub__(self, other):
        """`other - self`, row by row (diffusers' `1 - guidance_rescale`)."""
        if not isinstance(other, int | float):
            return NotImplemented
        return RowFactor([other - s for s in self.scales], self.rows, other - float(self))


class RowGuidance(RowFactor):
    """The guidance scale of a call whose requests' scales differ."""

    def __new__(cls, scales: Sequence[float], rows: BatchRows) -> Self:
        if len({scale > 1 for scale in scales}) > 1:
            raise ValueError("a call's requests are all guided (scale over 1) or none is")
        return super().__new__(cls, scales, rows)


def per_image(scales: Sequence[float], rows: BatchRows) -> list[float]:
    """The scale of each live image row, in row order, from each request's `scales`."""
    return [scales[i] for i in rows.live for _ in range(rows.sizes[i])]


def call_guidance(scales: Sequence[float], rows: BatchRows) -> float:
    """The guidance scale to give a pipeline call of requests with `scales`: a plain float
    where they agree, else a RowGuidance over the call's `rows`."""
    if len(set(scales)) == 1:
        return float(scales[0])
    return RowGuidance(scales, rows)


def call_rescale(rescales: Sequence[float], rows: BatchRows) -> float:
    """The guidance rescale to give a pipeline call of requests with `rescales`: a plain
    float where they agree, else a RowFactor over the call's `rows` that compares as the
    largest (the pipeline rescales when any row asks)."""
    if len(set(rescales)) == 1:
        return float(rescales[0])
    return RowFactor(rescales, rows, max(rescales))
