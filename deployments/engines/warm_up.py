"""The warm-up every engine runs before its replica reports healthy (calls of each batch
size and feature that runs other code, FP8 calibration first), and how compiled code
serves once it is done: compiled for exact shapes, nothing compiles under load."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from deployments.engines.speed import calibrate_fp8, calibration_calls
from serve.errors import OutOfMemory
from serve.types import GenerationRequest, ImagePrompt

if TYPE_CHECKING:
    from deployments.engines.controlnets import ControlNets
    from deployments.engines.image_prompts import ImagePrompts

log = logging.getLogger("ray.serve.atelier.engine")


class WarmUp:
    """The warm-up part of an engine (`DiffusersEngine`), which supplies `generate`, the
    speed settings applied (`speed`), `buckets`, `adapters` and `image_prompts`."""

    buckets: tuple[int, ...]
    cfg_cutoff: float | None
    image_prompts: ImagePrompts | None
    controlnets: ControlNets | None
    speed: dict
    calibrating = False  # FP8 activation scales still to calibrate (speed.fp8_activations)
    extra_sizes: tuple[tuple[int, int], ...] = ()  # sizes warmed up besides the default
    warming = False  # in the warm-up: calls compile what they meet

    def warm_up(self, request: GenerationRequest, max_images: int = 1) -> None:
        """The calls that bring the engine to full speed (`_warm_calls`), after the FP8
        activations' calibration where asked, each with enough steps for a guidance
        cutoff's unguided ones. Compiled for exact shapes, they are the only calls that
        compile: afterwards each compiled block runs the code compiled for the shapes it
        meets, or runs uncompiled where the warm-up met none (a call at another size or
        with other token counts, say), slower but without stalling the replica, and every
        request queued behind it, for a compilation (53 s for one bucket on the H200)."""
        if self.cfg_cutoff is not None:  # enough steps for the unguided ones to be warmed up
            steps = request.num_inference_steps
            while int(steps * self.cfg_cutoff) > steps - 2:
                steps += 1
            request = replace(request, num_inference_steps=steps)
        self.warming = True
        try:
            if self.calibrating:
                self._calibrate(request)
            self._warm_calls(request, max_images)
        finally:
            self.warming = False

    def _warm_counts(self, max_images: int) -> list[int]:
        """The image counts of the warm-up's calls: 1, 2 and `max_images`, or with batch
        buckets each bucket up to the one that holds `max_images`."""
        if self.buckets:
            counts = [b for b in self.buckets if b < max_images]
            return counts + [next((b for b in self.buckets if b >= max_images), max_images)]
        return sorted({1, min(2, max_images), max_images})

    def _warm_calls(self, request: GenerationRequest, max_images: int = 1) -> None:
        """Run `request` as calls of 1, 2 and `max_images` images: the first calls
        allocate memory and, with `speed.compile`, compile. Compiled code is specialised
        for one image, general from two on, and may split again at larger batches, so
        the largest batch is compiled here too rather than under load. With batch buckets,
        each bucket up to `max_images` is run instead (`_warm_all`)."""
        counts = self._warm_counts(max_images)
        sizes = [(request.width, request.height)]
        if request.source is None:  # other sizes: as text-to-image calls
            sizes += [s for s in self.extra_sizes if s != sizes[0]]
        for width, height in sizes:
            if not self._warm_all(replace(request, width=width, height=height), counts):
                return

    def _warm_all(self, request: GenerationRequest, counts: Sequence[int]) -> bool:
        """`request` as calls of each of `counts` images, then again with the LoRA slots
        primed for each adapter count calls are padded up to (`adapters.primings`):
        compiled, calls with adapters run other code. False once a call does not fit in
        memory (the larger counts are left)."""
        for priming in [nullcontext(), *self.adapters.primings()]:
            with priming:
                for images in counts:
                    if not self._warm_call(request, images):
                        return False
        return True

    def _warm_image_prompt(self, request: GenerationRequest, counts: Sequence[int]) -> None:
        """With IP-Adapters, calls of each of `counts` images with a (blank) image prompt
        for each (`_warm_all`): the image encoder's first work, and the adapters' attention
        where calls without one skip it."""
        if self.image_prompts is not None:
            blank = bytes(request.width * request.height * 3)
            prompt = ImagePrompt(blank, request.width, request.height, 1.0)
            extra = tuple((name, prompt) for name in self.image_prompts.names[1:])
            self._warm_all(replace(request, image_prompt=prompt, extra_image_prompts=extra),
                           counts)

    def _warm_controlnets(self, request: GenerationRequest, counts: Sequence[int]) -> None:
        """Calls of each of `counts` images steered by each ControlNet (a blank control
        image; `_warm_all`): their residuals enter the denoiser's blocks, other compiled
        code."""
        for steered in self.controlnets.warm_requests(request) if self.controlnets else []:
            self._warm_all(steered, counts)

    def _calibrate(self, request: GenerationRequest) -> None:
        """Calibrated FP8 activations: fix each FP8 layer's input scale from calls of the
        calibration prompts at the warm-up request's settings, before anything is
        compiled; one prompt per call, so that a device that holds one image at a time
        can calibrate too."""
        calls = calibration_calls(request)
        denoiser = getattr(self.pipe, self.denoiser)
        started = time.monotonic()
        self.speed["fp8_calibrated_layers"] = calibrate_fp8(
            denoiser, lambda: [self.generate([call]) for call in calls])
        self.calibrating = False
        log.info("FP8 activation scales calibrated on %d layers in %.1fs",
                 self.speed["fp8_calibrated_layers"], time.monotonic() - started)

    def _warm_call(self, request: GenerationRequest, images: int) -> bool:
        """One warm-up call of `images` images; False if it does not fit in memory."""
        try:
            self.generate([replace(request, num_outputs=1, seed=request.seed + i)
                           for i in range(images)])
        except OutOfMemory:
            # Serving splits such batches anyway; the replica need not fail for it.
            log.warning("warm-up: %d images of %dx%d do not fit in memory at once; "
                        "batches that large will run split", images, request.width,
                        request.height)
            return False
        return True

    def _compiled_for(self, first: GenerationRequest) -> AbstractContextManager:
        """Compiled for exact shapes and warmed up, a call compiles nothing (dynamo's
        `eager_on_recompile`): each block runs the code the warm-up compiled for its
        shapes, or runs uncompiled, slower than compiled code but without the minute a
        compilation of every block takes on a GPU, which every request queued behind it
        would wait. A tiling call runs uncompiled under any compilation: its convolutions
        pad otherwise."""
        compiled = bool(self.speed.get("compiled_blocks"))
        if compiled and first.tiling:
            return torch.compiler.set_stance("force_eager")
        if compiled and self.buckets and not self.warming:  # exact shapes, warmed up
            return torch.compiler.set_stance("eager_on_recompile")
        return nullcontext()
