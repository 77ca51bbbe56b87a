"""SDXL's refiner (Replicate's `refine`): an img2img pipeline that shares the base model's
second text encoder and VAE, run over the base model's latents with the same prompts and
per-image generators, either from `high_noise_frac` of the schedule on (expert ensemble)
or over the finished latents for `refine_steps` (base image refiner)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

from deployments.engines.loading import load_pipeline, quiet
from deployments.engines.long_prompts import LongPrompts
from deployments.engines.prompt_masks import padded
from deployments.engines.speed import attention_order
from deployments.engines.withdrawal import BatchRows
from serve.types import GenerationRequest

_EMBED_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                "negative_pooled_prompt_embeds")


def load_refiner(path: Path, variant: str | None, base, dtype: torch.dtype,
                 device: torch.device) -> StableDiffusionXLImg2ImgPipeline:
    """The refiner at `path`, with the base pipeline's second text encoder and VAE in place
    of its own (which are not read)."""
    refiner = load_pipeline(
        StableDiffusionXLImg2ImgPipeline, path, dtype, variant,
        text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
        vae=base.vae).to(device)
    return quiet(refiner)


def refined(refiner, long_prompts: LongPrompts, requests: Sequence[GenerationRequest],
            rows: BatchRows, generators: list[torch.Generator], out: torch.Tensor,
            callback: Callable, inputs: dict, attention: str) -> torch.Tensor:
    """The call's images: the base model's latents (`out`, the rows still live) refined
    as Replicate's SDXL does, with the call's guidance (`inputs`). Withdrawals go on as
    in the first stage."""
    first = requests[0]
    if not rows.live:  # every request left during the first stage
        return out.new_zeros(out.shape[0], 3, first.height, first.width)
    prompts = [(r.prompt, r.negative_prompt) for r in requests for _ in r.seeds]
    args = {"num_inference_steps": first.num_inference_steps} | refiner_embeds(
        refiner, long_prompts, [prompts[i] for i in rows.original_rows()])
    if first.refine == "expert_ensemble_refiner":
        args["denoising_start"] = first.high_noise_frac
    elif first.refine_steps:
        args["num_inference_steps"] = first.refine_steps
    with attention_order(attention):
        return refiner(
            image=out, guidance_scale=inputs.get("guidance_scale", first.guidance_scale),
            generator=generators, output_type="pt", callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=list(refiner._callback_tensor_inputs),
            **args).images


def refiner_embeds(refiner, long_prompts: LongPrompts,
                   prompts: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """The refiner's prompt embeddings for each row's (prompt, negative prompt): its one
    text encoder's (the base model's second), read in as many chunks as the base
    model's. Encoded with the refiner's call, not kept (refined calls are rare). An
    empty negative prompt is encoded, as the prompts Replicate's SDXL passes it are."""
    held = {}
    for pair in set(prompts):
        held[pair] = long_prompts.encode(
            [(refiner.tokenizer_2, refiner.text_encoder_2)], *pair, False, refiner.device,
            refiner.text_encoder_2.dtype)
    held = dict(zip(held, padded(list(held.values())), strict=True))
    return {name: torch.cat([held[pair][i] for pair in prompts])
            for i, name in enumerate(_EMBED_NAMES)}
