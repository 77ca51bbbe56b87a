"""Input images of img2img and inpainting calls: per-row pipeline inputs, the requests
that need no denoising at all, and putting the kept pixels back after inpainting."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from serve.types import GenerationRequest


def source_pil(request: GenerationRequest) -> Image.Image:
    return Image.frombytes("RGB", (request.width, request.height), request.source.rgb)


def mask_pil(request: GenerationRequest) -> Image.Image:
    return Image.frombytes("L", (request.width, request.height), request.source.mask)


# A request's input image (1×3×H×W) and mask (1×1×H×W, or None) as 8-bit tensors on the
# device: a quarter of float32's bytes cross to it, and the call scales them there.
SourceTensors = tuple[torch.Tensor, torch.Tensor | None]


def source_tensors(request: GenerationRequest, device: torch.device) -> SourceTensors | None:
    source = request.source
    if source is None:
        return None
    h, w = request.height, request.width
    image = torch.frombuffer(bytearray(source.rgb), dtype=torch.uint8).view(h, w, 3)
    image = image.permute(2, 0, 1)[None].to(device)
    if source.mask is None:
        return image, None
    return image, torch.frombuffer(bytearray(source.mask), dtype=torch.uint8).view(
        1, 1, h, w).to(device)


def source_inputs(requests: Sequence[GenerationRequest],
                  sources: Sequence[SourceTensors | None]) -> dict:
    """The pipeline arguments of a call's input images: one row per output image, in
    [0, 1] as the pipelines' image processors take tensors (the same values as from PIL)."""
    first = requests[0]
    if first.source is None:
        return {}

    def rows(part: int) -> torch.Tensor:
        return torch.cat([src[part].expand(r.num_outputs, -1, -1, -1)
                          for r, src in zip(requests, sources, strict=True)]).float() / 255

    inputs = {"image": rows(0), "strength": first.source.strength}
    if first.mode == "inpaint":
        inputs["mask_image"] = rows(1)
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
