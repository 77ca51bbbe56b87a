"""Input images of img2img, inpainting, Kontext edit, FLUX.1 Canny and ControlNet calls:
8-bit tensors on the device, per-row pipeline inputs, the requests that need no denoising
at all, and putting the kept pixels back after inpainting."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from serve.types import GenerationRequest

# A request's input image (1×3×H×W), mask (1×1×H×W, or None) and a Kontext edit's further
# references (each 1×3×h×w) as 8-bit tensors on the device: a quarter of float32's bytes
# cross to it, and the call scales them there.
SourceTensors = tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]]


def source_tensors(request: GenerationRequest, device: torch.device) -> SourceTensors | None:
    source = request.source
    if source is None:
        return None
    image = _rgb_tensor(source.rgb, request, device)
    references = tuple(_rgb_tensor(r.rgb, r, device) for r in source.references)
    if source.mask is None:
        return image, None, references
    return image, torch.frombuffer(bytearray(source.mask), dtype=torch.uint8).view(
        1, 1, request.height, request.width).to(device), references


def control_tensors(request: GenerationRequest,
                    device: torch.device) -> tuple[torch.Tensor, ...]:
    """The request's control images (each 1x3xHxW, 8-bit) on the device."""
    return tuple(_rgb_tensor(c.rgb, request, device) for c in request.controls)


def _rgb_tensor(rgb: bytes, sized, device: torch.device) -> torch.Tensor:
    """RGB bytes of `sized`'s width and height (a request's, a reference's) as 1×3×H×W."""
    image = torch.frombuffer(bytearray(rgb), dtype=torch.uint8)
    return image.view(sized.height, sized.width, 3).permute(2, 0, 1)[None].to(device)


def control_inputs(requests: Sequence[GenerationRequest],
                   controls: Sequence[tuple[torch.Tensor, ...]], signed: bool = False) -> dict:
    """The ControlNet pipelines' arguments of a call's control images, one row per output
    image in [0, 1] (their processor leaves tensors unnormalised), and the settings the
    call's requests share: for one ControlNet single values, for several lists (as
    diffusers' MultiControlNetModel takes them). Text-to-image takes them as `image`, the
    img2img and inpainting pipelines (whose `image` is the input) as `control_image`.
    `signed`: always as `control_image`, in [-1, 1] (FLUX's ControlNet pipelines)."""
    first = requests[0].controls
    if not first:
        return {}
    images = [_rows(requests, [c[i] for c in controls]).float() / 255
              for i in range(len(first))]
    if signed:
        images = [image * 2 - 1 for image in images]

    def one_or_all(values: list):
        return values[0] if len(values) == 1 else values

    key = "image" if requests[0].source is None and not signed else "control_image"
    return {key: one_or_all(images),
            "controlnet_conditioning_scale": one_or_all([c.scale for c in first]),
            "control_guidance_start": one_or_all([c.start for c in first]),
            "control_guidance_end": one_or_all([c.end for c in first])}


def source_inputs(requests: Sequence[GenerationRequest],
                  sources: Sequence[SourceTensors | None]) -> dict:
    """The pipeline arguments of a call's input images: one row per output image, in
    [0, 1] as the pipelines' image processors take tensors (the same values as from PIL),
    or a control image in [-1, 1] (FluxControlPipeline does not process tensors)."""
    first = requests[0]
    if first.source is None:
        return {}
    if first.source.control:  # FLUX.1 Canny's edges, every step run; the pipeline takes
        # a tensor as it is, so in the VAE's [-1, 1]
        return {"control_image": per_row(requests, sources, 0).float() / 127.5 - 1}
    inputs = {"image": per_row(requests, sources, 0).float() / 255}
    if first.source.edit:  # Kontext: a reference, at the output's own size and area
        inputs |= {"max_area": first.width * first.height, "_auto_resize": False}
        if first.source.references:  # further ones, at their own sizes
            inputs["references"] = [
                _rows(requests, [src[2][i] for src in sources]).float() / 255
                for i in range(len(first.source.references))]
    if first.mode != "edit":  # an edit runs every step: its pipeline takes no strength
        inputs["strength"] = first.source.strength
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


def keep_unmasked(pixels: torch.Tensor, requests: Sequence[GenerationRequest],
                  sources: Sequence[SourceTensors | None]) -> torch.Tensor:
    """Blend each inpainted image (8-bit rows, on the device) with its input by the mask
    (white: generated, black: the input's own pixels, grey: in between), so what the mask
    keeps is exact and not what the VAE makes of it."""
    out, start = pixels.float(), 0
    for request, (image, mask, _) in zip(requests, sources, strict=True):
        weight = mask.float() / 255
        rows = out[start:start + request.num_outputs]  # a view: blended in place
        rows.mul_(weight).add_(image.float() * (1 - weight))
        start += request.num_outputs
    return out.round_().to(torch.uint8)
