"""The hires pass (the WebUI's hires. fix) of SDXL and FLUX engines: a text-to-image call's
images, upscaled to the request's `output_size` (bicubic, or by one of the model's ESRGAN
upscalers), are redrawn by the family's img2img pipeline at `hires_strength`, with the
same prompts, ControlNets (their control images upscaled bilinearly) and per-image
generators. The same upscalers enlarge finished images without a redraw (`upscale`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from deployments.engines.base import to_uint8
from deployments.engines.tiling import resized
from deployments.engines.upscalers import UpscalerFile, load_upscaler, upscaled
from deployments.engines.withdrawal import BatchRows
from serve.types import GenerationRequest


class Upscalers:
    """A model's ESRGAN upscalers by name, loaded, with how each is tiled; a request's
    `hires_upscaler` outside them is bicubic."""

    def __init__(self, files: Mapping[str, UpscalerFile] | None, device: torch.device,
                 dtype: torch.dtype):
        files = dict(files or {})
        self.nets = {name: load_upscaler(f.path, device, dtype) for name, f in files.items()}
        self.tiles = {name: (f.tile, f.pad) for name, f in files.items()}

    def enlarged(self, name: str, images: torch.Tensor, size: tuple[int, int],
                 wrap: bool) -> torch.Tensor:
        """`images` in [0, 1] brought to `size` (height, width) by upscaler `name` (float32);
        with `wrap`, as images that tile (their edges continue each other)."""
        if name in self.nets:
            return upscaled(self.nets[name], images, size, wrap, *self.tiles[name])
        return resized(images.float(), size, "bicubic", wrap).clamp(0, 1)

    def describe(self) -> dict[str, str]:
        return {name: f"x{net.scale}" for name, net in self.nets.items()}


class HiresPass:
    """An engine's hires pass: its `_second_stage` calls `_hires` for a request with a
    `hires_scale`, and `_redraw` runs the family's img2img pipeline call."""

    upscalers: Upscalers
    embed_names: tuple[str, ...]

    def _hires(self, first: GenerationRequest, rows: BatchRows,
               generators: list[torch.Generator], out: torch.Tensor, callback: Callable,
               inputs: dict) -> torch.Tensor:
        """The first pass's images (`out`, rows still live) upscaled to the output size
        and redrawn; withdrawals go on as in the first pass."""
        width, height = first.output_size
        if not rows.live:  # every request left during the first pass
            return out.new_zeros(out.shape[0], 3, height, width)
        live = torch.tensor(rows.original_rows(), device=out.device)
        extra = {name: inputs[name][live] for name in self.embed_names}
        size = (height, width)  # a tiling image is upscaled as one (it wraps around)
        image = self.upscalers.enlarged(first.hires_upscaler, out, size, first.tiling)
        pipe = self._pipes["img2img"]
        if first.controls:
            pipe = self.controlnets.pipe(first, "img2img")
            extra |= _upscaled_controls(inputs, live, size, first.tiling)
        args = {"image": image, "strength": first.hires_strength,
                "num_inference_steps": first.hires_steps or first.num_inference_steps,
                "guidance_scale": inputs.get("guidance_scale", first.guidance_scale),
                "generator": generators,
                "output_type": "pt", "callback_on_step_end": callback,
                "callback_on_step_end_tensor_inputs": list(pipe._callback_tensor_inputs)}
        if "guidance_rescale" in inputs:  # the call's (SDXL's `_redraw` takes it)
            args["guidance_rescale"] = inputs["guidance_rescale"]
        rows.start_call()
        return self._redraw(pipe, first, args | extra)

    def _redraw(self, pipe, first: GenerationRequest, args: dict[str, Any]) -> torch.Tensor:
        """The family's img2img call of the hires pass, with `args`."""
        raise NotImplementedError

    def _enlarged(self, request: GenerationRequest, pixels: torch.Tensor) -> torch.Tensor:
        """The request's finished 8-bit images (rows, on the device) enlarged by its
        `upscale`, without a redraw."""
        if not request.enlarges:
            return pixels
        width, height = request.delivered_size
        images = self.upscalers.enlarged(request.upscaler, pixels.float() / 255,
                                         (height, width), request.tiling)
        return to_uint8(images)


def _upscaled_controls(inputs: dict, live: torch.Tensor, size: tuple[int, int],
                       wrap: bool) -> dict:
    """A text-to-image call's ControlNet arguments for its hires pass (img2img: the
    control images as `control_image`), the live rows' control images resized to `size`
    (height, width) bilinearly (wrapping round for a tiling call)."""
    def upscaled_rows(images: torch.Tensor) -> torch.Tensor:
        return resized(images[live], size, "bilinear", wrap)

    images = inputs["image" if "image" in inputs else "control_image"]  # (SDXL's, FLUX's)
    names = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end",
             "control_mode")
    return {"control_image": [upscaled_rows(i) for i in images] if isinstance(images, list)
            else upscaled_rows(images)} | {name: inputs[name] for name in names if name in inputs}
