"""Floating-point operations an image costs, counted from the model's own configs.

The denoiser (SDXL's UNet, FLUX's transformer) and the VAE are built on the meta device
(no memory, no weights) and run once under torch's FLOP counter, so the figure follows the
architecture in the model folder.
"""

from __future__ import annotations

import json
from pathlib import Path


def guided_steps(steps: int, cfg_cutoff: float | None) -> int:
    """How many of `steps` run with classifier-free guidance under speed.cfg_cutoff: those
    up to and including index int(steps x cutoff)."""
    return steps if cfg_cutoff is None else min(steps, int(steps * cfg_cutoff) + 1)


def sdxl_flops(folder: Path, size: int, steps: int, guided: int | None = None) -> dict:
    """FLOPs of one image of `size`² at `steps` steps of which `guided` (default: all) run
    with classifier-free guidance: UNet forward, a guided step (two forwards), VAE decode
    and the whole image."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
    side = size // 8
    time_dim = unet_cfg["addition_time_embed_dim"]
    text_dim = unet_cfg["projection_class_embeddings_input_dim"] - 6 * time_dim
    with torch.device("meta"):
        latents = torch.empty(1, unet_cfg["in_channels"], side, side)
        context = torch.empty(1, 77, unet_cfg["cross_attention_dim"])
        added = {"text_embeds": torch.empty(1, text_dim), "time_ids": torch.empty(1, 6)}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            unet(latents, torch.tensor(1.0), encoder_hidden_states=context,
                 added_cond_kwargs=added)
        unet_forward = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            vae.decode(torch.empty(1, vae_cfg["latent_channels"], side, side, device="meta"))
        vae_decode = counter.get_total_flops()
    guided = steps if guided is None else guided
    return {"unet_forward": unet_forward, "unet_step": 2 * unet_forward,
            "vae_decode": vae_decode, "size": size, "steps": steps, "guided_steps": guided,
            "image": unet_forward * (steps + guided) + vae_decode}


def flux_flops(folder: Path, size: int, steps: int) -> dict:
    """FLOPs of one FLUX image of `size`² at `steps` steps: one transformer forward per step
    (guidance is distilled into the model) over the packed image tokens and the T5 tokens
    the tokenizer reads (at most 512), VAE decode, and the whole image."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    tokens = json.loads((folder / "tokenizer_2" / "tokenizer_config.json").read_text())
    text = min(512, tokens["model_max_length"])
    image = (size // 16) ** 2  # 8x VAE, then 2x2 packing
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        inputs = {"hidden_states": torch.empty(1, image, cfg["in_channels"]),
                  "encoder_hidden_states": torch.empty(1, text, cfg["joint_attention_dim"]),
                  "pooled_projections": torch.empty(1, cfg["pooled_projection_dim"]),
                  "timestep": torch.ones(1), "img_ids": torch.zeros(image, 3),
                  "txt_ids": torch.zeros(text, 3),
                  "guidance": torch.ones(1) if cfg.get("guidance_embeds") else None}
        latents = torch.empty(1, vae_cfg["latent_channels"], size // 8, size // 8)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            transformer(**inputs)
        forward = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            vae.decode(latents)
        vae_decode = counter.get_total_flops()
    return {"transformer_forward": forward, "vae_decode": vae_decode, "size": size,
            "steps": steps, "text_tokens": text, "image_tokens": image,
            "image": forward * steps + vae_decode}


def image_flops(family: str, folder: Path, size: int, steps: int,
                cfg_cutoff: float | None = None, guided: bool = True) -> dict:
    """`sdxl_flops` or `flux_flops` for the model's family (FLUX has no guided steps); an
    SDXL image not `guided` (guidance at 1 or below) runs one UNet forward per step."""
    if family == "flux":
        return flux_flops(folder, size, steps)
    return sdxl_flops(folder, size, steps, guided_steps(steps, cfg_cutoff) if guided else 0)
