"""Variations of an image (a request's `variation_seed` and `variation_strength`), as the
WebUI's variation seed makes them: the starting noise is the spherical interpolation, at
the strength, from the seed's noise towards the variation seed's. At strength 0 it is the
seed's image exactly; small strengths give images close to it, 1 the variation seed's own.

The seed's noise is drawn from each image's generator as diffusers' text-to-image pipelines
draw it (a standard normal of the latents' shape, on the CPU, in the call's dtype; FLUX's
before its 2x2 patches are packed into tokens), so the
generator goes on to the later steps' noise in the same state, and rows without a
variation get the very noise the pipeline would have drawn."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from serve.types import GenerationRequest


def slerp(strength: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """The spherical interpolation from `start` to `end` (each one image's noise) at
    `strength`; linear where they are nearly parallel."""
    if strength == 0:
        return start
    a, b = start.flatten().double(), end.flatten().double()
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    if cos.abs() > 0.9995:
        mixed = (1 - strength) * a + strength * b
    else:
        omega = torch.acos(cos)
        mixed = (torch.sin((1 - strength) * omega) * a + torch.sin(strength * omega) * b) \
            / torch.sin(omega)
    return mixed.reshape(start.shape).to(start.dtype)


def varies(requests: Sequence[GenerationRequest]) -> bool:
    """Whether a call is text-to-image with a variation in one of its requests (the only
    calls whose starting noise is made here)."""
    return any(r.variation_strength for r in requests) and requests[0].source is None


def starting_noise(requests: Sequence[GenerationRequest], generators: list[torch.Generator],
                   shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The call's starting noise (one row per image, on the CPU): each image's from its
    generator, moved towards its variation seed's (`variation_seed + i` for image i)."""
    rows, index = [], 0
    for request in requests:
        for i in range(request.num_outputs):
            noise = torch.randn(shape, generator=generators[index], dtype=dtype)
            if request.variation_strength:
                other = torch.Generator("cpu").manual_seed(request.variation_seed + i)
                noise = slerp(request.variation_strength, noise,
                              torch.randn(shape, generator=other, dtype=dtype))
            rows.append(noise)
            index += 1
    return torch.cat(rows)
