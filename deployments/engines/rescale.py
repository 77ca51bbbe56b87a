"""Guidance rescale where diffusers' pipeline has none: its SDXL ControlNet text-to-image
and img2img pipelines guide without it (their inpainting one takes `guidance_rescale`).

While such a call runs, a hook on the UNet rescales each guided prediction as diffusers'
own SDXL pipelines do (`rescale_noise_cfg`, from "Common Diffusion Noise Schedules and
Sample Steps are Flawed"): it computes the pipeline's guided prediction from the UNet's
two halves, the rescaled one, and adds their difference to both halves, so that the
pipeline's own guidance arithmetic (uncond + scale x (text - uncond)) gives the rescaled
prediction. Steps run without guidance (`speed.cfg_cutoff`) are left as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    rescale_noise_cfg,
)


@contextmanager
def rescaled_guidance(pipe, rescale: float) -> Iterator[None]:
    """Rescale the guided predictions of `pipe`'s UNet by `rescale` (0-1) while the body
    runs a call of `pipe`."""
    def hook(module, args, output):
        if not pipe.do_classifier_free_guidance:
            return output
        sample = output[0] if isinstance(output, tuple) else output.sample
        uncond, text = sample.chunk(2)
        guided = uncond + pipe.guidance_scale * (text - uncond)
        shift = rescale_noise_cfg(guided, text, rescale) - guided
        sample = sample + torch.cat([shift, shift])
        if isinstance(output, tuple):
            return (sample, *output[1:])
        output.sample = sample
        return output

    handle = pipe.unet.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
