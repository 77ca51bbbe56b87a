"""Input images of img2img and inpainting calls: per-row pipeline inputs, the requests
that need no denoising at all, and putting the kept pixels back after inpainting."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from serve.types import GenerationRequest


def source_pil(request: GenerationRequest) -> Image.Image:
    return Image.frombytes("RGB", (request.width, request.height), request.source.rgb)


def mask_pil(request: GenerationRequest) -> Image.Image:
    return Image.frombytes("L", (request.width, request.height), request.source.mask)


def source_inputs(requests: Sequence[GenerationRequest]) -> dict:
    """The pipeline arguments of a call's input images, one per output image."""
    first = requests[0]
    if first.source is None:
        return {}
    rows = [r for r in requests for _ in r.seeds]
    inputs = {"image": [source_pil(r) for r in rows], "strength": first.source.strength}
    if first.mode == "inpaint":
        inputs["mask_image"] = [mask_pil(r) for r in rows]
    return inputs


def nothing_to_denoise(request: GenerationRequest) -> bool:
    """A strength this low runs no denoising step: the input is the answer."""
    return (request.source is not None
            and int(request.num_inference_steps * request.source.strength) < 1)


def keep_unmasked(requests: Sequence[GenerationRequest],
                  per_request: list[list[Image.Image]]) -> list[list[Image.Image]]:
    """Blend each inpainted image with its input by the mask (white: generated, black:
    the input's own pixels, grey: in between), so what the mask keeps is exact and not
    what the VAE makes of it."""
    out = []
    for request, images in zip(requests, per_request, strict=True):
        if not images:
            out.append(images)
            continue
        source = np.asarray(source_pil(request), dtype=np.float32)
        weight = np.asarray(mask_pil(request), dtype=np.float32)[..., None] / 255
        out.append([Image.fromarray(np.rint(np.asarray(im, dtype=np.float32) * weight
                                            + source * (1 - weight)).astype(np.uint8))
                    for im in images])
    return out
