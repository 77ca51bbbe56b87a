"""LoRA files: read in any layout the family's diffusers loader converts, checked against
the layers they must fit, and staged in (pinned) CPU memory. Only disk and CPU work, so
it runs off the pipeline thread."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from deployments.lora_scales import file_scalings, plain_scaling, refuse_other_variants
from deployments.lora_text import TextLayers, text_layers
from serve.adapters import AdapterEntry, AdapterInvalid

log = logging.getLogger("ray.serve.atelier.adapters")

# A family's LoRA reader: a file's tensors → (diffusers-layout state dict, alphas or None).
# Diffusers' `lora_state_dict` of the family's pipeline converts kohya and other layouts.
LoraReader = Callable[[dict[str, torch.Tensor]], tuple[dict, dict | None]]


@dataclass
class AdapterWeights:
    """One adapter staged for a slot: per denoiser layer path (A, B, alpha/rank), and its
    text-encoder parts (`deployments.lora_text`; empty when it has none)."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    text: TextLayers = field(default_factory=dict)


class Target(NamedTuple):
    """What one layer's LoRA pair must fit, and how to stage it."""

    in_features: int
    out_features: int
    dtype: torch.dtype
    pin: bool  # stage in pinned memory (for an asynchronous copy to a GPU)


def read_adapter(entry: AdapterEntry, reader: LoraReader | None, prefix: str, max_rank: int,
                 target_of: Callable[[str], Target | None],
                 encoders: Mapping[str, nn.Module] | None = None) -> AdapterWeights:
    """Read `entry`'s file and stage it for the denoiser layers `target_of` describes
    (None for a layer that takes no adapter) and for the text `encoders` (by their key
    prefix in LoRA files). Raises AdapterInvalid if it cannot be used."""
    name = entry.label
    try:
        raw = load_file(entry.path, device="cpu")
    except (OSError, SafetensorError, ValueError) as exc:
        raise AdapterInvalid(f"adapter {name} cannot be read: {exc}") from None
    state, alphas = _read_state(raw, name, reader)
    scalings = file_scalings(entry.path, f"adapter {name}")
    encoders = encoders or {}
    text = text_layers(state, alphas, encoders, name, max_rank, scalings)
    leads = tuple(f"{p}." for p in (prefix, *encoders))
    if any(not k.startswith(leads) for k in state):
        log.warning("adapter %s: weights of other models left out (%s only)", name,
                    ", ".join(p.rstrip(".") for p in leads))
    staged, scale = {}, scalings.get(prefix, plain_scaling)
    for path, (a, b, alpha) in _to_peft_layers(state, alphas, name, prefix).items():
        target = target_of(path)
        if target is None:
            raise AdapterInvalid(f"adapter {name} changes {path}, which is not among this "
                                 "model's lora_targets")
        rank = a.shape[0]
        if (rank > max_rank or a.shape[1] != target.in_features
                or b.shape != (target.out_features, rank)):
            raise AdapterInvalid(f"adapter {name} does not fit this model at {path}")
        a, b = a.to(target.dtype), b.to(target.dtype)
        if target.pin:
            a, b = a.pin_memory(), b.pin_memory()
        staged[path] = (a, b, scale(path, rank, alpha))
    if not staged and not text:
        raise AdapterInvalid(
            f"adapter {name} has no {prefix} LoRA weights, nor text-encoder ones")
    return AdapterWeights(entry.name, staged, text)


def _read_state(raw: dict[str, torch.Tensor], name: str,
                reader: LoraReader | None) -> tuple[dict, dict | None]:
    """(state dict with each model's prefix, alphas or None) of a file's tensors in any
    layout `reader` converts (default: SDXL's, which reads the diffusers/PEFT and kohya
    layouts). `name` labels the adapter in messages."""
    if reader is None:
        from diffusers import StableDiffusionXLPipeline

        reader = StableDiffusionXLPipeline.lora_state_dict
    try:
        return reader(raw)
    except (ValueError, KeyError, RuntimeError, AssertionError) as exc:
        raise AdapterInvalid(f"adapter {name} is not a LoRA diffusers can read: {exc}") from None


def _to_peft_layers(state: dict, alphas: dict | None, name: str,
                    prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """The denoiser's LoRA tensors by module path. `name` labels the adapter in
    messages."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    lead = f"{prefix}."
    own = {k.removeprefix(lead): v for k, v in state.items() if k.startswith(lead)}
    peft = convert_unet_state_dict_to_peft(own)
    refuse_other_variants(peft, f"adapter {name}")
    alpha_of = {}
    for key, value in (alphas or {}).items():
        (converted,) = convert_unet_state_dict_to_peft(
            {key.removeprefix(lead).removesuffix(".alpha"): None})
        alpha_of[converted.rsplit(".lora_", 1)[0]] = float(value)
    layers = {}
    for key, a in peft.items():
        if ".lora_A." not in key:
            continue
        path = key.split(".lora_A.")[0]
        b = peft.get(key.replace(".lora_A.", ".lora_B."))
        if b is None or a.ndim != 2 or b.ndim != 2:
            raise AdapterInvalid(f"adapter {name}: {path} is not a linear LoRA pair")
        layers[path] = (a, b, alpha_of.get(path))
    return layers
