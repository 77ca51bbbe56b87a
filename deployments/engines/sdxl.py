"""SDXL engine: text-to-image, img2img and inpainting with the seven Replicate schedulers,
LoRA adapters in the UNet and both text encoders, each mode steered by the model's
ControlNets (one or several at once) and by an image prompt (IP-Adapter), and an optional
refiner run after the base model (Replicate's `refine`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import (
    ControlNetModel,
    MultiControlNetModel,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from deployments.adapters import adapter_store
from deployments.engines.base import DiffusersEngine
from deployments.engines.controlnets import NetFiles
from deployments.engines.hires import HiresPass, Upscalers
from deployments.engines.image_prompts import ImagePrompts
from deployments.engines.long_prompts import LongPrompts
from deployments.engines.prompt_masks import padded, padding_masked
from deployments.engines.prompts import Embeds
from deployments.engines.refiner import load_refiner, refined
from deployments.engines.rescale import rescaled_guidance
from deployments.engines.row_guidance import call_guidance, call_rescale
from deployments.engines.sdxl_schedulers import make_schedulers
from deployments.engines.speed import attention_order
from deployments.engines.tiling import circular_padding, whole_vae
from deployments.engines.upscalers import UpscalerFile
from deployments.engines.variations import starting_noise, varies
from deployments.engines.withdrawal import BatchRows
from serve.adapters import AdapterEntry
from serve.config import SpeedConfig
from serve.errors import InvalidField
from serve.folders import INPAINTING_UNET_CHANNELS
from serve.model_parts import FAMILIES
from serve.types import GenerationRequest

# mode → the ControlNet pipeline of calls with ControlNets.
_CONTROLNET_PIPELINES = {"txt2img": StableDiffusionXLControlNetPipeline,
                         "img2img": StableDiffusionXLControlNetImg2ImgPipeline,
                         "inpaint": StableDiffusionXLControlNetInpaintPipeline}


class SDXLEngine(HiresPass, DiffusersEngine):
    """Loads an SDXL pipeline from local files only and runs compatible batches."""

    pipelines: ClassVar[dict[str, type]] = {"txt2img": StableDiffusionXLPipeline,
                 "img2img": StableDiffusionXLImg2ImgPipeline,
                 "inpaint": StableDiffusionXLInpaintPipeline}
    denoiser = "unet"
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    embed_names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                   "negative_pooled_prompt_embeds")

    def __init__(self, path: Path, dtype: str, device: str, variant: str | None = None,
                 adapters: Mapping[str, AdapterEntry] | None = None, max_adapters: int = 8,
                 max_lora_rank: int = 64,
                 lora_targets: Sequence[str] = FAMILIES["sdxl"].lora_targets,
                 simulate_oom_above_images: int | None = None,
                 speed: SpeedConfig | None = None, compile_cache: Path | None = None,
                 fuse_adapters: bool = False, refiner: Path | None = None,
                 refiner_variant: str | None = None,
                 controlnets: Mapping[str, NetFiles] | None = None,
                 ip_adapter: tuple[Path, str, str, str] | None = None,
                 depth_estimator: Path | None = None,
                 scheduler_options: Mapping[str, str | bool] | None = None,
                 merged_loras: Sequence[tuple[Path, float]] = (), vae: Path | None = None,
                 textual_inversions: Sequence[tuple[Path, str]] = (),
                 freeu: Mapping[str, float] | None = None,
                 prompts: Mapping[str, int | bool] | None = None,
                 upscalers: Mapping[str, UpscalerFile] | None = None):
        super().__init__(path, dtype, device, variant, simulate_oom_above_images, vae)
        # Each row its own guidance scale, unless the UNet embeds the scale (LCM-distilled).
        self.row_guidance = self.pipe.unet.config.time_cond_proj_dim is None
        self.merge_loras(merged_loras)
        self._load_embeddings(textual_inversions)
        self.prompt_settings = dict(prompts or {})  # chunks read, weights (long_prompts)
        reading = dict(self.prompt_settings)
        if reading.pop("clip_skip", 0) > self.most_clip_skip:  # the requests' default
            raise ValueError(f"prompts.clip_skip: at most {self.most_clip_skip} for this "
                             "model's text encoders")
        self.long_prompts = LongPrompts((self.pipe.tokenizer, self.pipe.tokenizer_2),
                                        convert=self.pipe.maybe_convert_prompt, **reading)
        self.upscalers = Upscalers(upscalers, self.device, self.dtype)
        self.freeu = dict(freeu or {})  # s1, s2, b1, b2 on the UNet the pipelines share
        if self.freeu:
            self.pipe.unet.enable_freeu(**self.freeu)
        if ip_adapter is not None:  # (folder, subfolder, weights file, image encoder)
            self.image_prompts = ImagePrompts(self.pipe, *ip_adapter)
        self._load_controlnets(controlnets, depth_estimator, (
            ControlNetModel, MultiControlNetModel, _CONTROLNET_PIPELINES))
        # The refiner shares the base model's text_encoder_2 and VAE (its own are not read).
        self.refiner = None if refiner is None else load_refiner(
            refiner, refiner_variant, self.pipe, self.dtype, self.device)
        # An inpainting UNet (noise, mask and masked image in) runs inpainting calls only.
        self.inpainting = self.pipe.unet.config.in_channels == INPAINTING_UNET_CHANNELS
        self.scheduler_options = dict(scheduler_options or {})
        self._schedulers = make_schedulers(self.pipe.scheduler.config,
                                           self.scheduler_options)
        self.adapters = adapter_store(
            self.pipe.unet, adapters, max_adapters, max_lora_rank, lora_targets,
            fuse=fuse_adapters, encoders={"text_encoder": self.pipe.text_encoder,
                                          "text_encoder_2": self.pipe.text_encoder_2})
        self.speed_up(speed or SpeedConfig(), compile_cache or path / ".compile")

    def _load_embeddings(self, embeddings: Sequence[tuple[Path, str]]) -> None:
        """Each textual-inversion file (SDXL's layout: `clip_l` and `clip_g` vectors) under
        its token, into both text encoders (the refiner shares the second)."""
        from safetensors.torch import load_file

        pipe = self.pipe
        for path, token in embeddings:
            vectors = load_file(path)
            missing = sorted({"clip_l", "clip_g"} - set(vectors))
            if missing:
                raise ValueError(f"textual inversion {path.name}: an SDXL embedding holds "
                                 f"clip_l and clip_g tensors; it has no {', '.join(missing)}")
            pipe.load_textual_inversion(vectors["clip_l"], token=token,
                                        text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(vectors["clip_g"], token=token,
                                        text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        self.embeddings = tuple(token for _, token in embeddings)

    def batch_key(self, request: GenerationRequest) -> tuple:
        """As every engine's, and by how many chunks the prompts are encoded in where
        prompts of other counts cannot share a call: with ControlNets, or compiled
        (`prompt_masks`)."""
        key = super().batch_key(request)
        if request.controls or self.speed.get("compiled_blocks"):
            return (*key, self.long_prompts.count(request.prompt, request.negative_prompt))
        return key

    def _encode(self, requests: Sequence[GenerationRequest],
                embeds: Sequence[Embeds]) -> dict:
        """As every engine's, shorter prompts padded to the longest (`prompt_masks`)."""
        return super()._encode(requests, padded(embeds))

    @contextmanager
    def _rows_follow(self, requests: Sequence[GenerationRequest], made: Sequence,
                     rows: BatchRows) -> Iterator[None]:
        """As every engine's, and each row's cross-attention (the base model's and the
        refiner's) reads its own prompt's tokens, not the padding (`prompt_masks`)."""
        unets = [self.pipe.unet] + ([] if self.refiner is None else [self.refiner.unet])
        lengths = [p.embeds[0].shape[1] for p in made]
        with super()._rows_follow(requests, made, rows), padding_masked(unets, lengths, rows):
            yield

    def prepare(self, request: GenerationRequest):
        """As every engine's, with a note for the client on each prompt cut short."""
        made, held = super().prepare(request)
        notes = self.long_prompts.notes(request.prompt, request.negative_prompt)
        return made._replace(notes=notes), held

    def _noise_inputs(self, pipe, requests: Sequence[GenerationRequest],
                      generators: list[torch.Generator]) -> dict:
        """A text-to-image call with a variation: the starting noise of every row, drawn
        from each image's generator as the pipeline would draw it, moved towards its
        variation seed's."""
        if not varies(requests):
            return {}
        first, channels = requests[0], pipe.unet.config.in_channels
        shape = (1, channels, first.height // pipe.vae_scale_factor,
                 first.width // pipe.vae_scale_factor)
        dtype = pipe.text_encoder_2.dtype  # the pipeline's latents take the embeddings'
        return {"latents": starting_noise(requests, generators, shape, dtype).to(self.device)}

    def _tiled(self, pipe, first: GenerationRequest):
        """A tiling call's convolutions, in the UNet, the VAE (both ways), its ControlNets
        and the refiner's UNet, pad circularly."""
        if not first.tiling:
            return super()._tiled(pipe, first)
        models = [pipe.unet, pipe.vae, getattr(pipe, "controlnet", None),
                  self.refiner and self.refiner.unet]
        return _wrapping([m for m in models if m is not None], pipe.vae)

    def _prepare(self, requests: Sequence[GenerationRequest], rows: BatchRows):
        first = requests[0]
        if self.inpainting and first.mode != "inpaint":
            raise ValueError("an inpainting UNet runs inpainting calls only (the model's "
                             "requests are made inpainting ones)")
        pipe = super()._prepare(requests, rows)
        if first.controls:
            pipe = self.controlnets.pipe(first)
        pipe.scheduler = self._schedulers[first.scheduler]
        return pipe

    def describe(self) -> dict:
        """As for every engine, with the scheduler options the model set, whether its
        UNet is an inpainting one, its embeddings' tokens, FreeU's scales and how prompts
        are read, and its hires pass's upscalers."""
        facts = super().describe()
        return facts | {"controlnets": list(self.controlnets.nets),
                        "scheduler_options": self.scheduler_options,
                        "inpainting_unet": self.inpainting, "embeddings": self.embeddings,
                        "freeu": self.freeu, "prompts": self.prompt_settings,
                        "upscalers": self.upscalers.describe()}

    def _encode_prompt(self, prompt: str, negative_prompt: str, clip_skip: int = 0) -> Embeds:
        pipe = self.pipe
        return self.long_prompts.encode(
            [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)],
            prompt, negative_prompt, pipe.config.force_zeros_for_empty_prompt, self.device,
            pipe.text_encoder_2.dtype, clip_skip)

    @property
    def most_clip_skip(self) -> int:
        """The most layers a prompt's reading may skip: the shallower text encoder's
        layers less one (skipping them all reads its token embeddings)."""
        return min(self.pipe.text_encoder.config.num_hidden_layers,
                   self.pipe.text_encoder_2.config.num_hidden_layers) - 1

    def check_request(self, request: GenerationRequest) -> None:
        """As every engine's, and the request's `clip_skip` within the text encoders."""
        super().check_request(request)
        if request.clip_skip > self.most_clip_skip:
            raise InvalidField("clip_skip", f"must be at most {self.most_clip_skip}: this "
                                            "model's text encoders have no earlier layer")

    def _warm_calls(self, request: GenerationRequest, max_images: int = 1) -> None:
        """As for every engine, then the same calls at the default size with an image
        prompt and with each ControlNet, and one refined call, so that they are warm too."""
        super()._warm_calls(request, max_images)
        counts = self._warm_counts(max_images)
        self._warm_image_prompt(request, counts)
        self._warm_controlnets(request, counts)
        if self.refiner is not None:
            self.generate([replace(request, refine="expert_ensemble_refiner",
                                   high_noise_frac=0.5)])

    def _call(self, pipe, first: GenerationRequest, generators: list[torch.Generator],
              inputs: dict, callback: Callable) -> torch.Tensor:
        """With refinement, the base model hands over latents: for an expert ensemble,
        noisy ones at `high_noise_frac` of the schedule."""
        if first.refine != "no_refiner":
            if self.refiner is None:
                raise ValueError("this engine has no refiner")
            inputs = inputs | {"output_type": "latent"}
        if first.refine == "expert_ensemble_refiner":
            inputs = inputs | {"denoising_end": first.high_noise_frac}
        rescale = inputs.get("guidance_rescale", 0.0)
        if rescale and not _rescales_itself(first):
            inputs = {k: v for k, v in inputs.items() if k != "guidance_rescale"}
            with rescaled_guidance(pipe, rescale):
                return super()._call(pipe, first, generators, inputs, callback)
        return super()._call(pipe, first, generators, inputs, callback)

    def _guidance_inputs(self, requests: Sequence[GenerationRequest],
                         rows: BatchRows) -> dict:
        """The call's guidance rescale, where any request rescales, and its guidance
        scale: each row its own request's (`RowFactor`, `RowGuidance`)."""
        rescale = call_rescale([r.guidance_rescale for r in requests], rows)
        inputs = {"guidance_rescale": rescale} if rescale else {}
        if not self.row_guidance:
            return inputs
        scales = [r.guidance_scale for r in requests]
        return inputs | {"guidance_scale": call_guidance(scales, rows)}

    def _decode_latents(self, pipe, latents: torch.Tensor, width: int,
                        height: int) -> torch.Tensor:
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # fp16 overflows
        if upcast:
            vae.to(torch.float32)
        try:
            mean, std = getattr(vae.config, "latents_mean", None), getattr(
                vae.config, "latents_std", None)
            latents = latents.to(next(vae.post_quant_conv.parameters()).dtype)
            if mean is not None and std is not None:
                latents = (latents * latents.new_tensor(std).view(1, -1, 1, 1)
                           / vae.config.scaling_factor + latents.new_tensor(mean).view(1, -1, 1, 1))
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        return pipe.image_processor.postprocess(image, output_type="pt")

    def _second_stage(self, requests: Sequence[GenerationRequest], rows: BatchRows,
                      generators: list[torch.Generator], out: torch.Tensor,
                      callback: Callable, inputs: dict) -> torch.Tensor:
        """The hires pass of a request that asks for one, or the refiner (`refiner.py`)."""
        first = requests[0]
        if first.hires_scale != 1:
            return self._hires(first, rows, generators, out, callback, inputs)
        if first.refine == "no_refiner":
            return out
        return refined(self.refiner, self.long_prompts, requests, rows, generators, out,
                       callback, inputs, self.attention)

    def _redraw(self, pipe, first: GenerationRequest, args: dict) -> torch.Tensor:
        """The hires pass's img2img call, at the request's scheduler and the call's
        guidance rescale (the ControlNet img2img pipeline takes none: hooked in)."""
        pipe.scheduler = self._schedulers[first.scheduler]
        rescale = args.pop("guidance_rescale", 0.0)
        if rescale and not first.controls:
            args["guidance_rescale"] = rescale
        hook = rescaled_guidance(pipe, rescale) if rescale and first.controls else nullcontext()
        with attention_order(self.attention), hook:
            return pipe(**args).images


@contextmanager
def _wrapping(models: list, vae) -> Iterator[None]:
    """The models' convolutions pad circularly, and the VAE reads whole images."""
    with circular_padding(models), whole_vae(vae):
        yield


def _rescales_itself(first: GenerationRequest) -> bool:
    """Whether the call's diffusers pipeline takes `guidance_rescale`: all but the
    ControlNet text-to-image and img2img ones."""
    return not first.controls or first.mode == "inpaint"
