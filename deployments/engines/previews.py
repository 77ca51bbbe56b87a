"""Partial images: a request's images as the call currently foresees them, decoded at a
few steps while it denoises (what OpenAI's streamed `partial_images` deliver).

After every step the scheduler's estimate of the finished latents is kept: the samplers
that compute one return it from their step (Euler, Euler ancestral, DDIM, Heun, LCM),
DPM-Solver++ and UniPC keep it as their last model output, and for flow matching (FLUX)
it is the sample less sigma times the predicted velocity. With other samplers (PNDM,
DEIS) a partial image shows the current, still noisy, latents. Decoding is one VAE pass per previewed
image, inside the call (batches of one, a shape the warm-up compiles): the other requests
of the batch keep their pixels.
A partial image that fails to decode (out of memory) is skipped, not the call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from deployments.engines.withdrawal import BatchRows

log = logging.getLogger("ray.serve.atelier.engine")

# decode(pipe, latents of some rows) -> those rows' images in [0, 1] (N, C, H, W)
Decode = Callable[[object, torch.Tensor], torch.Tensor]
PreviewListener = Callable[[int, list[Image.Image]], None]  # (request index, its images)


def preview_steps(count: int, total: int) -> set[int]:
    """The steps (counted from 1) after which `count` partial images are taken in a call
    of `total` steps: evenly spaced, before the last step (whose image is the result)."""
    return {max(1, total * (j + 1) // (count + 1)) for j in range(count)} - {total}


class Previews:
    """Takes the partial images of a call's requests; `wanted[i]` is request i's count."""

    def __init__(self, wanted: Sequence[int], rows: BatchRows, decode: Decode,
                 to_images: Callable[[torch.Tensor], list[Image.Image]],
                 on_preview: PreviewListener):
        self.wanted, self.sent = list(wanted), [0] * len(wanted)
        self._rows, self._decode, self._to_images = rows, decode, to_images
        self._on_preview = on_preview
        self._estimate: torch.Tensor | None = None
        self._tapped = None

    @contextmanager
    def tapping(self, pipe) -> Iterator[None]:
        """Around the pipeline call: keep each step's estimate of the finished latents."""
        scheduler, self._tapped = pipe.scheduler, pipe
        original = scheduler.step

        def step(model_output, timestep, sample, *args, **kwargs):
            out = original(model_output, timestep, sample, *args, **kwargs)
            self._estimate = _estimate(scheduler, out, model_output, sample)
            return out

        scheduler.step = step
        try:
            yield
        finally:
            del scheduler.step  # the class's own again
            self._estimate, self._tapped = None, None

    def __call__(self, pipe, step: int, latents: torch.Tensor) -> None:
        """After denoising step `step` (from 0), with the call's current latents."""
        total = pipe.num_timesteps
        due = {i for i in self._rows.live if self.sent[i] < self.wanted[i]
               and step + 1 in preview_steps(self.wanted[i], total)}
        if not due:
            return
        estimate = self._estimate if pipe is self._tapped else None
        if estimate is None or estimate.shape != latents.shape:
            estimate = latents
        rows, owners, row = [], [], 0
        for index in self._rows.live:
            size = self._rows.sizes[index]
            if index in due:
                rows.extend(range(row, row + size))
                owners.append((index, size))
            row += size
        try:  # one image at a time: compiled decoders meet only the batch size of 1
            images = [image for row in rows for image in self._to_images(
                self._decode(pipe, estimate[row:row + 1].to(latents.dtype)))]
        except Exception:  # partial images are a courtesy: the call goes on
            log.exception("partial images failed; the call goes on without them")
            for index in due:
                self.wanted[index] = self.sent[index]
            return
        start = 0
        for index, size in owners:
            self.sent[index] += 1
            self._on_preview(index, images[start:start + size])
            start += size


def _estimate(scheduler, out, model_output: torch.Tensor,
              sample: torch.Tensor) -> torch.Tensor | None:
    """The step's estimate of the finished latents, where the sampler gives one."""
    found = out[1] if isinstance(out, tuple) and len(out) > 1 else getattr(
        out, "pred_original_sample", None)
    if torch.is_tensor(found):
        return found
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigma = scheduler.sigmas[scheduler.step_index - 1]  # the step just taken
        return sample.float() - sigma.to(sample.device) * model_output.float()
    outputs = getattr(scheduler, "model_outputs", None)
    config = scheduler.config
    keeps_x0 = "dpmsolver++" in str(getattr(config, "algorithm_type", "")) or getattr(
        config, "predict_x0", False)  # (UniPC's)
    if keeps_x0 and outputs and torch.is_tensor(outputs[-1]):
        return outputs[-1]
    return None
