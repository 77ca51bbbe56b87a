"""FLUX engines: FLUX.1 text-to-image, img2img and inpainting with flow-matching Euler,
FLUX.1 Kontext's edits, FLUX.1 Fill's inpainting and outpainting, and FLUX.1 Canny's and
Depth's control by edges and by depth.

`guidance_scale` is FLUX's distilled guidance (the transformer's guidance embedding, as
`guidance` on Replicate's flux-dev); there is no negative prompt and one forward pass per
step. Schnell-style checkpoints ignore it. LoRA adapters live in slots of the transformer
or are merged into its weights, read from the diffusers/PEFT (ai-toolkit) layout or
kohya's (BFL module names). The speed settings are SDXL's, applied to the transformer.

A Kontext model's edit appends the reference image's latent tokens to the ones being
denoised (diffusers' FluxKontextPipeline, FluxKontextInpaintPipeline with a mask), so each
step computes both; its text-to-image is plain FLUX. A Fill model's transformer takes the
masked image's latents and the mask beside the noise on every step (diffusers'
FluxFillPipeline): it draws the mask's white part to fit what is kept, and nothing else.
A FLUX model with FLUX.1 Redux reads image prompts as more prompt tokens
(`deployments.engines.redux`), one with XLabs' IP-Adapter through an attention over the
picture's tokens in each double-stream block (`deployments.engines.image_prompts`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import (
    FluxControlNetImg2ImgPipeline,
    FluxControlNetInpaintPipeline,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxControlPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextInpaintPipeline,
    FluxMultiControlNetModel,
    FluxPipeline,
)
from PIL import Image

from deployments.adapters import adapter_store
from deployments.engines.base import DiffusersEngine, Prepared
from deployments.engines.controlnets import NetFiles
from deployments.engines.hires import HiresPass, Upscalers
from deployments.engines.image_prompts import FluxImagePrompts
from deployments.engines.kontext import KontextReferencesPipeline
from deployments.engines.prompts import Embeds
from deployments.engines.redux import Redux
from deployments.engines.row_guidance import per_image
from deployments.engines.sources import control_inputs
from deployments.engines.speed import attention_order
from deployments.engines.upscalers import UpscalerFile
from deployments.engines.variations import starting_noise, varies
from deployments.engines.withdrawal import BatchRows
from serve.adapters import AdapterEntry
from serve.config import SpeedConfig
from serve.model_parts import FAMILIES
from serve.types import GenerationRequest, ImagePrompt, SourceImage

# mode → the ControlNet pipeline of calls with ControlNets.
_CONTROLNET_PIPELINES = {"txt2img": FluxControlNetPipeline,
                         "img2img": FluxControlNetImg2ImgPipeline,
                         "inpaint": FluxControlNetInpaintPipeline}


class FluxEngine(HiresPass, DiffusersEngine):
    pipelines: ClassVar[dict[str, type]] = {"txt2img": FluxPipeline,
                                            "img2img": FluxImg2ImgPipeline,
                                            "inpaint": FluxInpaintPipeline}
    denoiser = "transformer"
    parts = ("transformer", "vae", "text_encoder", "text_encoder_2")
    row_guidance = True  # each row's guidance embedding its own request's (`_rows_follow`)
    embed_names = ("prompt_embeds", "pooled_prompt_embeds")
    redux: Redux | None = None  # the model's FLUX.1 Redux, if it has one
    # The FLUX ControlNet pipelines encode the control images' latents before their loop,
    # out of the step callback's reach: the rows of calls with ControlNets stay.
    control_rows_stay = True

    def __init__(self, path: Path, dtype: str, device: str, variant: str | None = None,
                 simulate_oom_above_images: int | None = None,
                 adapters: Mapping[str, AdapterEntry] | None = None, max_adapters: int = 8,
                 max_lora_rank: int = 64,
                 lora_targets: Sequence[str] = FAMILIES["flux"].lora_targets,
                 fuse_adapters: bool = False, speed: SpeedConfig | None = None,
                 compile_cache: Path | None = None, redux: Path | None = None,
                 controlnets: Mapping[str, NetFiles] | None = None,
                 depth_estimator: Path | None = None,
                 ip_adapter: tuple[Path, str, str, str] | None = None,
                 merged_loras: Sequence[tuple[Path, float]] = (), vae: Path | None = None,
                 upscalers: Mapping[str, UpscalerFile] | None = None):
        super().__init__(path, dtype, device, variant, simulate_oom_above_images, vae)
        self.merge_loras(merged_loras)
        self.upscalers = Upscalers(upscalers, self.device, self.dtype)
        self._load_controlnets(controlnets, depth_estimator, (
            FluxControlNetModel, FluxMultiControlNetModel, _CONTROLNET_PIPELINES))
        if ip_adapter is not None:  # (folder, subfolder, weights file, image encoder)
            self.image_prompts = FluxImagePrompts(self.pipe, *ip_adapter)
        if redux is not None:
            self.redux = Redux(redux, self.dtype, self.device,
                               self.pipe.transformer.config.joint_attention_dim)
        self.adapters = adapter_store(
            self.pipe.transformer, adapters, max_adapters, max_lora_rank, lora_targets,
            prefix="transformer", reader=partial(FluxPipeline.lora_state_dict,
                                                 return_alphas=True), fuse=fuse_adapters,
            encoders={"text_encoder": self.pipe.text_encoder})
        self.speed_up(speed or SpeedConfig(), compile_cache or path / ".compile")
        # T5 reads the tokenizer's length, at most the 512 tokens FLUX was trained on.
        self.max_sequence_length = min(512, self.pipe.tokenizer_2.model_max_length)

    def batch_key(self, request: GenerationRequest) -> tuple:
        """As every engine's, and by how many Redux picture tokens follow the prompt's
        (none without an image prompt): a call's rows have as many tokens each."""
        prompt, redux = request.image_prompt, self.redux
        return (*super().batch_key(request), 0 if prompt is None or redux is None
                else redux.count(prompt.downsampling) * len(prompt.pictures))

    @torch.inference_mode()
    def prepare(self, request: GenerationRequest) -> tuple[Prepared, bool]:
        """As every engine's; a Redux image prompt's tokens are appended to the prompt's."""
        made, held = super().prepare(request)
        if request.image_prompt is None or self.redux is None:
            return made, held
        return made._replace(embeds=self.redux.appended(made.embeds, request.image_prompt)), held

    def _warm_calls(self, request: GenerationRequest, max_images: int = 1) -> None:
        """As every engine's; with Redux, the same calls with an image prompt too (more
        tokens per step: other kernels, other compiled code); with an IP-Adapter, one call
        with an image prompt (every call runs the adapter's attention: this warms its image
        encoder); then the same calls at the default size with each ControlNet."""
        super()._warm_calls(request, max_images)
        if self.redux is not None and request.image_prompt is None:
            blank = ImagePrompt(bytes(8 * 8 * 3), 8, 8, 1.0)
            super()._warm_calls(replace(request, image_prompt=blank), max_images)
        self._warm_image_prompt(request, [1])
        self._warm_controlnets(request, self._warm_counts(max_images))

    def describe(self) -> dict:
        facts = super().describe()
        return facts | {"redux": self.redux is not None,
                        "ip_adapter": self.image_prompts is not None,
                        "controlnets": list(self.controlnets.nets),
                        "upscalers": self.upscalers.describe()}

    def _second_stage(self, requests: Sequence[GenerationRequest], rows: BatchRows,
                      generators: list[torch.Generator], out: torch.Tensor,
                      callback: Callable, inputs: dict) -> torch.Tensor:
        """A text-to-image call's hires pass (`HiresPass`), where its requests ask."""
        first = requests[0]
        if first.hires_scale == 1:
            return out
        return self._hires(first, rows, generators, out, callback, inputs)

    def _redraw(self, pipe, first: GenerationRequest, args: dict) -> torch.Tensor:
        """FLUX's img2img call of the hires pass, told the output's size (else it would
        resize the images to the model's default) and T5's length."""
        width, height = first.output_size
        with attention_order(self.attention):
            return pipe(width=width, height=height, **self._call_inputs(), **args).images

    def _prepare(self, requests: Sequence[GenerationRequest], rows: BatchRows):
        """As every engine's; a call with ControlNets runs the FLUX ControlNet pipeline of
        its mode."""
        pipe = super()._prepare(requests, rows)
        return self.controlnets.pipe(requests[0]) if requests[0].controls else pipe

    def _control_inputs(self, requests: Sequence[GenerationRequest],
                        controls: Sequence[tuple[torch.Tensor, ...]]) -> dict:
        """As every engine's, the control images in the VAE's [-1, 1] (the FLUX
        ControlNet pipelines encode tensors as they are) and with their union modes."""
        inputs = control_inputs(requests, controls, signed=True)
        if inputs:
            inputs["control_mode"] = self.controlnets.control_modes(requests[0])
        return inputs

    @contextmanager
    def _rows_follow(self, requests: Sequence[GenerationRequest], made: Sequence[Prepared],
                     rows: BatchRows) -> Iterator[None]:
        """The pipeline makes the transformer's `guidance` and `pooled_projections` for all
        the call's rows before its loop, out of the step callback's reach; once requests
        leave (their latents dropped), only the live rows of those go in: by their places
        among the rows the pipeline call started with (a hires pass's second call starts
        with those the first left). Where the requests' guidance scales differ, the
        pipeline makes every row's `guidance` of the first's: each live row gets its own
        request's, in the transformer and in ControlNets that embed it. So do the image
        prompts' embeddings of a model with an IP-Adapter (`FluxImagePrompts`)."""
        scales = [r.guidance_scale for r in requests]
        mixed = len(set(scales)) > 1

        def own_scales(module, args, kwargs):
            guidance = kwargs.get("guidance")
            if mixed and guidance is not None:
                kwargs["guidance"] = torch.tensor(per_image(scales, rows),
                                                  dtype=guidance.dtype, device=guidance.device)
            return args, kwargs

        def live_rows(module, args, kwargs):
            count = kwargs["hidden_states"].shape[0]
            for name in ("guidance", "pooled_projections"):
                value = kwargs.get(name)
                if value is not None and value.shape[0] > count:
                    kwargs[name] = value[rows.call_rows()]
            return own_scales(module, args, kwargs)

        nets = self.controlnets.nets.values() if self.controlnets else ()
        hooks = [self.pipe.transformer.register_forward_pre_hook(live_rows, with_kwargs=True),
                 *(net.register_forward_pre_hook(own_scales, with_kwargs=True) for net in nets)]
        try:
            with super()._rows_follow(requests, made, rows):  # image prompts' embeddings
                yield
        finally:
            for hook in hooks:
                hook.remove()

    def _encode_prompt(self, prompt: str, negative_prompt: str, clip_skip: int = 0) -> Embeds:
        # T5 pads every prompt to the same length, so one call's embeddings stack. (FLUX
        # reads CLIP's pooled output: requests naming a layer are refused before here.)
        pos, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        return pos, pooled

    def _call_inputs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def _noise_inputs(self, pipe, requests: Sequence[GenerationRequest],
                      generators: list[torch.Generator]) -> dict:
        """A text-to-image call with a variation: the starting noise of every row, drawn
        from each image's generator as FluxPipeline draws it (latents of 16 channels,
        then packed 2x2 into tokens), moved towards its variation seed's."""
        if not varies(requests):
            return {}
        first, channels = requests[0], pipe.transformer.config.in_channels // 4
        height, width = (2 * (side // (pipe.vae_scale_factor * 2))
                         for side in (first.height, first.width))
        noise = starting_noise(requests, generators, (1, channels, height, width),
                               pipe.text_encoder_2.dtype)
        packed = pipe._pack_latents(noise, len(noise), channels, height, width)
        return {"latents": packed.to(self.device)}

    def _decode_latents(self, pipe, latents: torch.Tensor, width: int,
                        height: int) -> torch.Tensor:
        vae = pipe.vae
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pt")


class FluxKontextEngine(FluxEngine):
    """FLUX.1 Kontext: text-to-image as FLUX, and edits of a reference image by
    instruction, of the whole image (reading further reference images too, if sent) or,
    with a mask, of its white part (the image is its own reference; the unmasked pixels
    are kept). An edit call's rows stay to its end (the
    pipeline holds the references' latents out of the step callback's reach), as
    inpainting's do."""

    pipelines: ClassVar[dict[str, type]] = {"txt2img": FluxPipeline,
                                            "edit": KontextReferencesPipeline,
                                            "inpaint": FluxKontextInpaintPipeline}

    def _warm_calls(self, request: GenerationRequest, max_images: int = 1) -> None:
        """As for FLUX, then the same calls as edits of a blank reference (twice the tokens
        per step: other kernels, other compiled code)."""
        super()._warm_calls(request, max_images)
        blank = SourceImage.blank(request.width, request.height, "edit")
        super()._warm_calls(replace(request, source=blank), max_images)


class FluxFillEngine(FluxEngine):
    """FLUX.1 Fill: every request is an image and a mask, the mask's white part drawn anew
    (inpainting, or outpainting where the image was padded), the rest kept exactly. Its
    rows stay to the call's end, as inpainting's do; it has no text-to-image, so a
    replica warms it up and keeps it warm with fills of a blank image."""

    pipelines: ClassVar[dict[str, type]] = {"inpaint": FluxFillPipeline}


class FluxControlEngine(FluxEngine):
    """FLUX.1 Canny: every request is a control image (Canny edges, found on the CPU side),
    whose latents the transformer reads beside the noise on every step (diffusers'
    FluxControlPipeline), so the output follows its edges. Its rows stay to the call's
    end (the control latents are out of the step callback's reach); a replica warms it up
    and keeps it warm with a blank control image."""

    pipelines: ClassVar[dict[str, type]] = {"control": FluxControlPipeline}


class FluxDepthEngine(FluxControlEngine):
    """FLUX.1 Depth: as FLUX.1 Canny, the control image's latents beside the noise on every
    step, the control image being the depth map of the request's picture, estimated on the
    replica (`deployments.engines.depth`, from the model's depth estimator) when the request
    is prepared."""

    @torch.inference_mode()
    def prepare(self, request: GenerationRequest) -> tuple[Prepared, bool]:
        """As Canny's, with the picture's depth map as the control image."""
        source = request.source
        picture = Image.frombytes("RGB", (request.width, request.height), source.rgb)
        mapped = replace(source, rgb=self.depth_maps.of(picture).tobytes())
        return super().prepare(replace(request, source=mapped))
