"""Input images of img2img, inpainting and ControlNet calls: 8-bit tensors on the device,
per-row pipeline inputs, the requests that need no denoising at all, and putting the kept
pixels back after inpainting."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from serve.types import GenerationRequest


def source_pil(request: GenerationRequest) -> Image.Image:
    return Image.frombytes("RGB", (request.width, request.height), request.source.rgb)


# A request's input image (1×3×H×W) and mask (1×1×H×W, or None) as 8-bit tensors on the
# device: a quarter of float32's bytes cross to it, and the call scales them there.
SourceTensors = tuple[torch.Tensor, torch.Tensor | None]


def source_tensors(request: GenerationRequest, device: torch.device) -> SourceTensors | None:
    source = request.source
    if source is None:
        return None
    image = _rgb_tensor(source.rgb, request, device)
    if source.mask is None:
        return image, None
    return image, torch.frombuffer(bytearray(source.mask), dtype=torch.uint8).view(
        1, 1, request.height, request.width).to(device)


def control_tensor(request: GenerationRequest, device: torch.device) -> torch.Tensor | None:
    """The request's control image (1x3xHxW, 8-bit) on the device, or None."""
    return None if request.control is None else _rgb_tensor(request.control.rgb, request, device)


def _rgb_tensor(rgb: bytes, request: GenerationRequest, device: torch.device) -> torch.Tensor:
    image = torch.frombuffer(bytearray(rgb), dtype=torch.uint8)
    return image.view(request.height, request.width, 3).permute(2, 0, 1)[None].to(device)


def control_inputs(requests: Sequence[GenerationRequest],
                   controls: Sequence[torch.Tensor | None]) -> dict:
    """The ControlNet pipeline's arguments of a call's control images, one row per output
    image in [0, 1] (the pipeline's processor leaves tensors unnormalised), and the
    ControlNet settings the call's requests share."""
    control = requests[0].control
    if control is None:
        return {}
    return {"image": _rows(requests, controls).float() / 255,
            "controlnet_conditioning_scale": control.scale,
            "control_guidance_start": control.start, "control_guidance_end": control.end}


def source_inputs(requests: Sequence[GenerationRequest],
                  sources: Sequence[SourceTensors | None]) -> dict:
    """The pipeline arguments of a call's input images: one row per output image, in
    [0, 1] as the pipelines' image processors take tensors (the same values as from PIL)."""
    first = requests[0]
    if first.source is None:
        return {}
    inputs = {"image": per_row(requests, sources, 0).float() / 255,
              "strength": first.source.strength}
    if first.mode == "inpaint":
        inputs["mask_image"] = per_row(requests, sources, 1).float() / 255
    return inputs


def per_row(requests: Sequence[GenerationRequest], sources: Sequence[SourceTensors | None],
            part: int) -> torch.Tensor:
    """Each request's input image (part 0) or mask (part 1) once per output image."""
    return _rows(requests, [src[part] for src in sources])


def _rows(requests: Sequence[GenerationRequest], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.expand(r.num_outputs, -1, -1, -1)
                      for r, t in zip(requests, tensors, strict=True)])


def nothing_to_denoise(request: GenerationRequest) -> bool:
    """A strength this low runs no denoising step: the input is the answer."""
    return (request.source is not None
            and int(request.num_inference_steps * request.source.strength) < 1)


def keep_unmasked(pixels: torch.Tensor, requests: Sequence[GenerationRequest],
                  sources: Sequence[SourceTensors | None]) -> torch.Tensor:
    """Blend each inpainted image (8-bit rows, on the device) with its input by the mask
    (white: generated, black: the input's own pixels, grey: in between), so what the mask
    keeps is exact and not what the VAE makes of it."""
    out, start = pixels.float(), 0
    for request, (image, mask) in zip(requests, sources, strict=True):
        weight = mask.float() / 255
        rows = out[start:start + request.num_outputs]  # a view: blended in place
        rows.mul_(weight).add_(image.float() * (1 - weight))
        start += request.num_outputs
    return out.round_().to(torch.uint8)
