"""What every diffusers engine shares: batched calls with per-image seeds, withdrawal
between steps, out-of-memory recovery, output conversion; loading from local files
(`loaded.py`) and the warm-up (`warm_up.py`). A family's engine says which pipelines it runs and how
prompts are encoded."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import ClassVar, NamedTuple

import torch
from PIL import Image

from deployments.engines.loaded import LoadedPipelines
from deployments.engines.previews import PreviewListener, Previews
from deployments.engines.prompts import Embeds, stack
from deployments.engines.sources import (
    SourceTensors,
    control_inputs,
    control_tensors,
    keep_unmasked,
    source_inputs,
    source_tensors,
)
from deployments.engines.speed import attention_order
from deployments.engines.warm_up import WarmUp
from deployments.engines.withdrawal import BatchRows, step_callback
from serve.errors import OutOfMemory
from serve.types import GenerationRequest

log = logging.getLogger("ray.serve.atelier.engine")


class Prepared(NamedTuple):
    """What a request's call needs, made before the call: prompt embeddings (one image's),
    the input image and mask and the control images on the device, and the image prompts'
    embeddings (one per IP-Adapter, None where the request sends it none)."""

    embeds: Embeds
    source: SourceTensors | None
    controls: tuple[torch.Tensor, ...] = ()
    image_prompt: tuple[torch.Tensor | None, ...] | None = None
    notes: tuple[str, ...] = ()  # for the client: what of the request was not used


class DiffusersEngine(LoadedPipelines, WarmUp):
    """Runs compatible batches on a family's loaded pipelines (`LoadedPipelines`).

    Guarantees: image i of a request depends only on the request and its seed i, not on
    the other requests of its batch (prompts are encoded per request, latents and noise
    come from one CPU generator per image).
    """

    embed_names: ClassVar[tuple[str, ...]]  # pipeline inputs made by `_encode_prompt`
    control_rows_stay = False  # whether the rows of calls with ControlNets stay to the end
    row_guidance = False  # whether a call's rows may have their own guidance scales

    def check_request(self, request: GenerationRequest) -> None:
        """Raise InvalidField for what the request asks that this model cannot do and the
        serving side cannot know (it does not read the weights)."""

    @torch.inference_mode()
    def prepare(self, request: GenerationRequest) -> tuple[Prepared, bool]:
        """The request's prompt embeddings, input and control images and image prompt,
        made ahead of its call (from any thread), and whether the embeddings were already
        held."""
        embeds, held = self.prompts.get(request)
        image = self.image_prompts and self.image_prompts.embeds(request)
        if self.controlnets:  # pictures to ControlNets that preprocess depth: their maps
            request = self.controlnets.with_depth_maps(request)
        return Prepared(embeds, source_tensors(request, self.device),
                        control_tensors(request, self.device), image), held

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest],
                 withdrawn: Callable[[], set[int]] = set,
                 on_step: Callable[[int, int], None] | None = None,
                 prepared: Sequence[Prepared] | None = None,
                 on_preview: PreviewListener | None = None) -> list[list[Image.Image]]:
        """Run one pipeline call for compatible requests; return each request's images.

        All requests must share `batch_key`; raises ValueError otherwise. `withdrawn()`
        gives the indexes of requests nobody waits for any more: after each denoising step
        their rows leave the batch (they get no images; where the pipeline keeps per-row
        state out of the callback's reach they run on), and once all have left, the call
        stops. `on_step(step, total)` is called after each denoising step, and
        `on_preview(index, images)` with request `index`'s partial images (its
        `partial_images`). `prepared` holds the requests' `prepare` results; those not
        given are made here.
        """
        first = requests[0]
        if any(self.batch_key(r) != self.batch_key(first) for r in requests):
            raise ValueError("a pipeline call needs requests with equal batch keys")
        if first.runs_no_step:  # the input is the answer (enlarged, if asked)
            return self._inputs_answered(requests)
        real = len(requests)
        # 1. Pad the call to its bucket and hold its adapters before the prompts not yet
        # prepared are encoded, as a replica does, so an adapter's file is read once (its
        # text-encoder parts with the rest).
        requests, withdrawn = self._padded(requests, withdrawn)
        rows = BatchRows([r.num_outputs for r in requests])
        pipe = self._prepare(requests, rows)
        made = list(prepared or ())
        made += [self.prepare(r)[0] for r in requests[len(made):real]]
        made += made[-1:] * (len(requests) - real)  # a filler repeats the last request
        # 2. The pipeline's inputs, and the step callback that withdraws rows and reports.
        generators = [torch.Generator("cpu").manual_seed(seed)
                      for r in requests for seed in r.seeds]
        inputs = self._pipeline_inputs(pipe, requests, rows, made, generators)
        previews = self._previews(requests[:real], rows, on_preview)
        callback = self._step_callback(first, rows, generators, withdrawn, on_step, previews)
        # 3. Run the call, finish and deliver its images.
        out_of_memory = False
        try:
            tap = previews.tapping(pipe) if previews else nullcontext()
            with self._rows_follow(requests, made, rows), tap, self._compiled_for(first), \
                    self._tiled(pipe, first):
                out = self._call(pipe, first, generators, inputs, callback)
                images = self._second_stage(requests, rows, generators, out, callback,
                                            inputs)
            pixels = self._finish(requests, made, to_uint8(images))
            delivered = self._delivered(requests[:real], rows, pixels)
        except torch.OutOfMemoryError:
            out_of_memory = True  # handled below, once the failed call's frames are gone
        if out_of_memory:
            raise self._recover_memory(requests)
        return delivered

    def _pipeline_inputs(self, pipe, requests: Sequence[GenerationRequest], rows: BatchRows,
                         made: Sequence[Prepared], generators: list[torch.Generator]) -> dict:
        """The call's pipeline inputs: prompts, input images, control images, starting
        noise and guidance, each for every row."""
        return (self._encode(requests, [p.embeds for p in made])
                | source_inputs(requests, [p.source for p in made])
                | self._control_inputs(requests, [p.controls for p in made])
                | self._noise_inputs(pipe, requests, generators)
                | self._guidance_inputs(requests, rows))

    def _step_callback(self, first: GenerationRequest, rows: BatchRows,
                       generators: list[torch.Generator], withdrawn: Callable[[], set[int]],
                       on_step: Callable[[int, int], None] | None,
                       previews: Previews | None) -> Callable:
        """The pipeline's step callback (`step_callback`). Inpainting, Kontext edits and
        FLUX.1 Canny keep per-row state (the mask and both guidance halves of it; the
        references' or control images' latents) out of the callback's reach: their rows
        stay, and inpainting keeps guidance on every step. With buckets the call keeps its
        padded size to the end: dropping withdrawn rows would meet the compiled code with a
        batch size it was not compiled for."""
        rows_stay = first.mode in ("inpaint", "edit", "control") or (
            self.control_rows_stay and bool(first.controls))
        return step_callback(rows, generators, withdrawn, on_step,
                             shrink_rows=not rows_stay and not self.buckets,
                             cfg_cutoff=None if rows_stay else self.cfg_cutoff,
                             previews=previews)

    def _delivered(self, requests: Sequence[GenerationRequest], rows: BatchRows,
                   pixels: torch.Tensor) -> list[list[Image.Image]]:
        """Each request's images (none for a withdrawn one) from the call's finished 8-bit
        images (`pixels`, the live rows; a filler's last), each request's enlarged by its
        own `upscale`."""
        out: list[list[Image.Image]] = [[] for _ in requests]
        start = 0
        for i in (i for i in rows.live if i < len(requests)):
            part = pixels[start:start + rows.sizes[i]]
            out[i] = pil_rows(self._enlarged(requests[i], part))
            start += rows.sizes[i]
        return out

    def _tiled(self, pipe, first: GenerationRequest) -> AbstractContextManager:
        """Around a call: what makes its images tile when its requests ask (`tiling`);
        an engine that cannot refuses them."""
        if first.tiling:
            raise ValueError("this engine draws no tiling images")
        return nullcontext()

    def _previews(self, requests: Sequence[GenerationRequest], rows: BatchRows,
                  on_preview: PreviewListener | None) -> Previews | None:
        """The taker of the call's partial images, if a request wants some (fillers
        padding the call to a bucket want none)."""
        wanted = [r.partial_images for r in requests]
        if on_preview is None or not any(wanted):
            return None
        wanted += [0] * (len(rows.sizes) - len(wanted))
        size = (requests[0].width, requests[0].height)
        return Previews(wanted, rows, lambda pipe, latents: self._decode_latents(
            pipe, latents, *size), to_pil, on_preview)

    def _decode_latents(self, pipe, latents: torch.Tensor, width: int,
                        height: int) -> torch.Tensor:
        """Images in [0, 1] (N, C, H, W) of latents as the pipeline's loop holds them, as
        the pipeline itself decodes its result."""
        raise NotImplementedError

    def _padded(self, requests: Sequence[GenerationRequest], withdrawn: Callable[[], set[int]],
                ) -> tuple[list[GenerationRequest], Callable[[], set[int]]]:
        """With batch buckets: the requests plus one filler request whose images bring the
        call up to the smallest bucket that holds it, and a `withdrawn` under which the
        filler leaves once every real request has."""
        images = sum(r.num_outputs for r in requests)
        bucket = next((b for b in self.buckets if b >= images), images)
        if bucket == images:
            return list(requests), withdrawn
        real = range(len(requests))
        filler = replace(requests[-1], num_outputs=bucket - images, request_id="")

        def gone() -> set[int]:
            left = set(withdrawn())
            return left | {len(real)} if left.issuperset(real) else left

        return [*requests, filler], gone

    def batch_key(self, request: GenerationRequest) -> tuple:
        """Requests with equal keys can share one of this engine's calls: the request's
        own key, without its adapter set where the adapters can differ between the rows
        of a call (LoRA slots), and with only whether it is guided where the guidance
        scale can differ between them (`row_guidance`)."""
        key = request.any_guidance_key if self.row_guidance else request.shared_key
        return key if self.adapters.mixes_sets else (*key, request.adapters.key)

    def _guidance_inputs(self, requests: Sequence[GenerationRequest],
                         rows: BatchRows) -> dict:
        """Pipeline inputs that give each row its own request's guidance scale, where the
        family's pipeline takes them (`row_guidance`)."""
        return {}

    def _prepare(self, requests: Sequence[GenerationRequest], rows: BatchRows):
        """Set the pipeline up for a call of `requests` (images `rows`), each with its
        adapter set active; return the pipeline."""
        self.adapters.activate_call([r.adapters for r in requests], rows)
        return self._pipes[requests[0].mode]

    def _second_stage(self, requests: Sequence[GenerationRequest], rows: BatchRows,
                      generators: list[torch.Generator], out: torch.Tensor,
                      callback: Callable, inputs: dict) -> torch.Tensor:
        """The call's images from what its pipeline call returned (`out`, rows still live;
        `inputs`: the call's, for every row): a family may run a second pass over them
        here (SDXL's refiner, or a hires pass)."""
        return out

    def _inputs_answered(self, requests: Sequence[GenerationRequest]) -> list[list[Image.Image]]:
        """Each request's input image as each of its images (no step runs), enlarged by
        its `upscale`."""
        try:
            return [[image.copy() for image in pil_rows(self._enlarged(
                r, source_tensors(r, self.device)[0])) for _ in r.seeds] for r in requests]
        except torch.OutOfMemoryError:
            pass  # handled below, as a call's, once the failed frames are gone
        raise self._recover_memory(requests)

    def _enlarged(self, request: GenerationRequest, pixels: torch.Tensor) -> torch.Tensor:
        """The request's finished 8-bit images (rows) as delivered: a family may enlarge
        them here (`upscale`, `HiresPass`)."""
        return pixels

    def _rows_follow(self, requests: Sequence[GenerationRequest], made: Sequence[Prepared],
                     rows: BatchRows) -> AbstractContextManager:
        """Around a call: keep per-row inputs the step callback cannot reach in step with
        the rows still live (`rows`): here, image prompts' (`image_prompts.following`)."""
        if self.image_prompts is None:
            return nullcontext()
        return self.image_prompts.following(requests, [p.image_prompt for p in made], rows)

    def _control_inputs(self, requests: Sequence[GenerationRequest],
                        controls: Sequence[tuple[torch.Tensor, ...]]) -> dict:
        """The pipeline arguments of the call's control images (`control_inputs`)."""
        return control_inputs(requests, controls)

    def _encode(self, requests: Sequence[GenerationRequest],
                embeds: Sequence[Embeds]) -> dict:
        """The call's prompt inputs: each request's embeddings once per image."""
        return stack(self.embed_names, requests, embeds) | self._call_inputs()

    def _encode_prompt(self, prompt: str, negative_prompt: str, clip_skip: int = 0) -> Embeds:
        """One image's embeddings of a prompt, in `embed_names` order, read `clip_skip`
        layers before the text encoders' penultimate where the family reads one."""
        raise NotImplementedError

    def _noise_inputs(self, pipe, requests: Sequence[GenerationRequest],
                      generators: list[torch.Generator]) -> dict:
        """Pipeline inputs for the call's starting noise, made here where a family mixes
        in requests' variation seeds (SDXL); none: the pipeline draws it."""
        return {}

    def _call_inputs(self) -> dict:
        """Pipeline inputs every call passes besides the embeddings."""
        return {}

    def _finish(self, requests: Sequence[GenerationRequest], made: Sequence[Prepared],
                pixels: torch.Tensor) -> torch.Tensor:
        """The call's 8-bit images (rows, on the device) as they are to be delivered: for
        inpainting, the input's own pixels where the mask keeps them."""
        if requests[0].mode == "inpaint":  # its rows never leave: they match the sources
            return keep_unmasked(pixels, requests, [p.source for p in made])
        return pixels

    def _call(self, pipe, first: GenerationRequest, generators: list[torch.Generator],
              inputs: dict, callback: Callable) -> torch.Tensor:
        if self.simulate_oom_above_images and len(generators) > self.simulate_oom_above_images:
            raise torch.OutOfMemoryError(f"simulated: {len(generators)} images in one call")
        args = {"width": first.width, "height": first.height,
                "num_inference_steps": first.num_inference_steps,
                "guidance_scale": first.guidance_scale, "generator": generators,
                "output_type": "pt", "callback_on_step_end": callback,
                "callback_on_step_end_tensor_inputs": list(pipe._callback_tensor_inputs)}
        with attention_order(self.attention):
            return pipe(**(args | inputs)).images

    def _recover_memory(self, requests: Sequence[GenerationRequest]) -> OutOfMemory:
        """Give the failed call's memory back; the error to raise, so the caller can retry
        smaller batches."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        images, r = sum(q.num_outputs for q in requests), requests[0]
        log.warning("%s ran out of memory: %d request(s), %d image(s) of %dx%d",
                    self.device, len(requests), images, r.width, r.height)
        return OutOfMemory(f"{self.device} ran out of memory for {len(requests)} request(s), "
                           f"{images} image(s) of {r.width}x{r.height}; retry later, or ask "
                           "for fewer images or a smaller size")



def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [0, 1] (N, C, H, W) on the device → PIL, with the same rounding as
    diffusers' own PIL output, but quantized to 8 bits where the images are, so only a
    quarter of the bytes cross to the CPU and the CPU does no arithmetic."""
    return pil_rows(to_uint8(images))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


def pil_rows(pixels: torch.Tensor) -> list[Image.Image]:
    """8-bit images (N, C, H, W), wherever they are → PIL."""
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in array]
