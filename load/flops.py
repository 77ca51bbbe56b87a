"""Floating-point operations an SDXL image costs, counted from the model's own configs.

The UNet and VAE are built on the meta device (no memory, no weights) and run once under
torch's FLOP counter, so the figure follows the architecture in the model folder.
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
