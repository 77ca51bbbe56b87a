"""SDXL's schedulers, by the names requests give them: Replicate's seven, its
SDXL-Lightning's, LCM's, and those of the WebUI and ComfyUI, each made from the
checkpoint's own scheduler config."""

from __future__ import annotations

import inspect

from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

# Replicate's names → (diffusers class, extra config).
SDXL_SCHEDULERS = {
    "K_EULER": (EulerDiscreteScheduler, {}),
    "K_EULER_ANCESTRAL": (EulerAncestralDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
    "DPMSolverMultistep": (DPMSolverMultistepScheduler, {}),
    "HeunDiscrete": (HeunDiscreteScheduler, {}),
    "KarrasDPM": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
    # Replicate's SDXL-Lightning's: second-order SDE DPM-Solver++, noise from each image's
    # generator.
    "DPM++2MSDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    # Latent consistency (LCM-LoRA, LCM-distilled UNets): a few steps at guidance 1 to 2.
    "LCM": (LCMScheduler, {}),
    # As AUTOMATIC1111's WebUI and ComfyUI name them: DPM++ 2M SDE Karras, UniPC, DEIS.
    "DPM++2MSDEKarras": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++",
                                                        "use_karras_sigmas": True}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "DEIS": (DEISMultistepScheduler, {}),
}


def make_schedulers(config, options: dict) -> dict:
    """Each scheduler that takes every option (`scheduler_options`), from the checkpoint's
    scheduler `config` (HeunDiscrete, PNDM and DEIS cannot rescale to zero terminal SNR)."""
    return {name: cls.from_config(config, **(extra | options))
            for name, (cls, extra) in SDXL_SCHEDULERS.items()
            if set(options) <= set(inspect.signature(cls.__init__).parameters)}
