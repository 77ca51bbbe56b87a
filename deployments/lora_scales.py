"""How much each layer of a LoRA file adds, and which LoRA variants a file may use.

A layer adds `alpha/rank × B·A·x` (`alpha/√rank` for rank-stabilised LoRA). The alphas come
from one of two places:
- kohya-style files carry them beside their weights (`….alpha`);
- diffusers (≥ 0.35) writes the PEFT `LoraConfig` each model was trained with into the
  file's safetensors metadata, under `lora_adapter_metadata`, one model per key prefix
  (`unet.lora_alpha`, `text_encoder.alpha_pattern` …). Its loader builds each model's
  `LoraConfig` from that metadata whenever it is there.
A file with neither has alpha = rank. A file trained with `lora_alpha` ≠ `r` therefore
gives the images it was trained for only if its metadata is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable

from safetensors import SafetensorError, safe_open

from serve.adapters import AdapterInvalid

# (layer path in its model, rank of the layer's weights, file's own alpha or None) → factor
Scaling = Callable[[str, int, float | None], float]


def plain_scaling(path: str, rank: int, alpha: float | None) -> float:
    """alpha/rank, with the file's own alpha for the layer, or alpha = rank without one."""
    return (alpha if alpha is not None else rank) / rank


def file_scalings(path: str, label: str) -> dict[str, Scaling]:
    """The scaling of each model (by key prefix) whose LoraConfig the file at `path` keeps
    in its metadata; empty for a file without such metadata. `label` names the adapter in
    messages. Raises AdapterInvalid for metadata diffusers could not use either."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    try:
        with safe_open(path, framework="pt") as handle:
            raw = (handle.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    except (OSError, SafetensorError) as exc:
        raise AdapterInvalid(f"{label} cannot be read: {exc}") from None
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        flat = None
    if not isinstance(flat, dict):
        raise AdapterInvalid(f"{label}: its {LORA_ADAPTER_METADATA_KEY} is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        prefix, _, option = key.partition(".")
        configs.setdefault(prefix, {})[option] = value
    return {prefix: _config_scaling(config, f"{label} ({prefix})")
            for prefix, config in configs.items()}


def _config_scaling(options: dict, label: str) -> Scaling:
    """Each layer's factor as PEFT's LoRA layers take it from `LoraConfig(**options)`:
    rank and alpha from `rank_pattern`/`alpha_pattern` where a pattern matches the layer's
    path, else `r`/`lora_alpha`, over √rank with `use_rslora`. Options this PEFT does not
    know are left out when unset (a newer PEFT's, at their defaults)."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(k for k, v in options.items() if k not in known and v)
    if unknown:  # options of a newer PEFT that are set: they may change what layers do
        raise AdapterInvalid(f"{label}: its LoRA metadata sets {', '.join(unknown)}, "
                             "which this PEFT does not know")
    try:
        config = LoraConfig(**{k: v for k, v in options.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise AdapterInvalid(f"{label}: its LoRA metadata is no LoraConfig: {exc}") from None
    if not _numbers_fit(config):
        raise AdapterInvalid(f"{label}: its LoRA metadata gives a rank that is no positive "
                             "whole number or an alpha that is no number")
    if config.use_dora or config.lora_bias:
        raise AdapterInvalid(f"{label} uses {'DoRA' if config.use_dora else 'LoRA biases'}, "
                             "which Atelier does not apply; only plain LoRA pairs")

    def scaling(path: str, rank: int, alpha: float | None) -> float:
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern, path), config.r)
        if r != rank:
            raise AdapterInvalid(f"{label}: its metadata gives {path} rank {r}, its "
                                 f"weights rank {rank}")
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, path),
                                         config.lora_alpha)
        return alpha / (math.sqrt(r) if config.use_rslora else r)

    return scaling


def _numbers_fit(config) -> bool:
    """Whether `config`'s ranks are positive whole numbers and its alphas numbers."""
    patterns = (config.rank_pattern, config.alpha_pattern)
    if not all(isinstance(p, dict) for p in patterns):
        return False
    ranks = [config.r, *config.rank_pattern.values()]
    alphas = [config.lora_alpha, *config.alpha_pattern.values()]
    return (all(type(r) is int and r > 0 for r in ranks)
            and all(type(a) in (int, float) for a in alphas))


def refuse_other_variants(keys: Iterable[str], label: str) -> None:
    """Raise AdapterInvalid if PEFT-layout `keys` hold more than LoRA pairs' weights
    (DoRA magnitudes, LoRA biases, …): they change what a layer computes, so dropping
    them would give other images than the adapter's."""
    for key in keys:
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise AdapterInvalid(f"{label} holds {key}, which is not a plain LoRA weight; "
                                 "Atelier applies only plain LoRA pairs (no DoRA, no biases)")
