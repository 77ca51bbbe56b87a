"""LoRA adapters on a replica: fixed slots in the denoiser (SDXL's UNet, FLUX's
transformer), filled and switched in place.

At start the denoiser gets `capacity` LoRA slots (PEFT layers of `max_rank` on the configured
target modules), so no module is ever injected or removed while serving:

- `read` (any thread): the file's tensors, converted to PEFT keys, checked against the
  slots' shapes and staged in (pinned) CPU memory. Only disk and CPU work.
- `inject` (pipeline thread, between calls): copy those tensors into a free or least
  recently used slot — a device copy, no module surgery.
- `activate` (pipeline thread): point every LoRA layer at the slots of a set and set their
  scales — attribute writes only; switching between held adapters reloads nothing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from serve.adapters import AdapterEntry, AdapterInvalid, AdapterSet

log = logging.getLogger("ray.serve.atelier.adapters")


# A family's LoRA reader: a file's tensors → (diffusers-layout state dict, alphas or None).
# Diffusers' `lora_state_dict` of the family's pipeline converts kohya and other layouts.
LoraReader = Callable[[dict[str, torch.Tensor]], tuple[dict, dict | None]]


@dataclass
class AdapterWeights:
    """One adapter staged for a slot: per LoRA layer (A, B, alpha/rank)."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


class AdapterSlots:
    """An LRU of adapters held in `capacity` preallocated LoRA slots of one denoiser.

    `prefix` is the denoiser's key prefix in LoRA files ("unet", "transformer"); `reader`
    reads the family's layouts.
    """

    def __init__(self, denoiser, catalog: Mapping[str, AdapterEntry], capacity: int,
                 max_rank: int, targets: Sequence[str], prefix: str = "unet",
                 reader: LoraReader | None = None):
        self._catalog, self._max_rank = catalog, max_rank
        self._prefix, self._reader = prefix, reader
        self._slots = [f"slot{i}" for i in range(capacity)] if catalog else []
        if self._slots:
            from peft import LoraConfig

            for slot in self._slots:
                denoiser.add_adapter(LoraConfig(r=max_rank, lora_alpha=max_rank,
                                                target_modules=list(targets)),
                                     adapter_name=slot)
        from peft.tuners.lora import LoraLayer

        self._layers = {path: m for path, m in denoiser.named_modules()
                        if isinstance(m, LoraLayer)}
        self._held: OrderedDict[str, str] = OrderedDict()  # adapter name → slot
        self._alphas: dict[str, list[float]] = {}  # per adapter, aligned with _layers
        self._active: AdapterSet | None = None
        self.activate(AdapterSet())

    @property
    def loaded(self) -> list[str]:
        return list(self._held)

    def read(self, name: str) -> AdapterWeights:
        """Stage the adapter's tensors. Raises AdapterInvalid if it cannot fill a slot."""
        entry = self._catalog[name]
        try:
            raw = load_file(entry.path, device="cpu")
        except (OSError, SafetensorError, ValueError) as exc:
            raise AdapterInvalid(f"adapter {name!r} cannot be read: {exc}") from None
        layers = _to_peft_layers(raw, name, self._reader, self._prefix)
        staged = {}
        for path, (a, b, alpha) in layers.items():
            slot_a, slot_b = self._slot_weights(path, name)
            rank = a.shape[0]
            if (rank > self._max_rank or a.shape[1] != slot_a.shape[1]
                    or b.shape != (slot_b.shape[0], rank)):
                raise AdapterInvalid(f"adapter {name!r} does not fit this model at {path}")
            a, b = a.to(slot_a.dtype), b.to(slot_b.dtype)
            if slot_a.is_cuda:
                a, b = a.pin_memory(), b.pin_memory()
            staged[path] = (a, b, (alpha if alpha is not None else rank) / rank)
        return AdapterWeights(name, staged)

    def inject(self, name: str, weights: AdapterWeights, keep: tuple[str, ...] = ()) -> None:
        """Copy staged weights into a free slot or the least recently used one not in
        `keep`. Raises AdapterInvalid when every slot is needed by `keep`."""
        if name in self._held:
            self._held.move_to_end(name)
            return
        slot = self._free_slot(keep)
        with torch.no_grad():
            for path, layer in self._layers.items():
                slot_a, slot_b = layer.lora_A[slot].weight, layer.lora_B[slot].weight
                if path in weights.layers:
                    a, b, _ = weights.layers[path]
                    rank = a.shape[0]
                    slot_a[:rank].copy_(a, non_blocking=True)
                    slot_a[rank:].zero_()
                    slot_b[:, :rank].copy_(b, non_blocking=True)
                    slot_b[:, rank:].zero_()
                else:
                    slot_b.zero_()
        self._alphas[name] = [weights.layers[p][2] if p in weights.layers else 0.0
                              for p in self._layers]
        self._held[name] = slot
        self._active = None

    def activate(self, adapters: AdapterSet) -> None:
        """Make exactly `adapters` (with their scales) active; load any that are missing."""
        for name in adapters.names:
            if name not in self._held:
                self.inject(name, self.read(name), keep=tuple(adapters.names))
            self._held.move_to_end(name)
        if adapters == self._active:
            return
        slots = [self._held[n] for n in adapters.names]
        scaled = [(self._held[n], s, self._alphas[n]) for n, s in adapters.items]
        for i, layer in enumerate(self._layers.values()):
            layer._active_adapter = slots
            for slot, scale, alphas in scaled:
                layer.scaling[slot] = scale * alphas[i]
        self._active = adapters

    def _slot_weights(self, path: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self._layers.get(path)
        if layer is None or not self._slots:
            raise AdapterInvalid(f"adapter {name!r} changes {path}, which is not among this "
                                 "model's lora_targets")
        slot = self._slots[0]
        return layer.lora_A[slot].weight, layer.lora_B[slot].weight

    def _free_slot(self, keep: tuple[str, ...]) -> str:
        used = set(self._held.values())
        for slot in self._slots:
            if slot not in used:
                return slot
        victim = next((n for n in self._held if n not in keep), None)
        if victim is None:
            raise AdapterInvalid("more adapters in one request than this replica holds")
        log.info("unloading adapter %s", victim)
        return self._held.pop(victim)


def _to_peft_layers(raw: dict[str, torch.Tensor], name: str, reader: LoraReader | None,
                    prefix: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """The denoiser's LoRA tensors by module path, from any layout `reader` converts
    (default: SDXL's, which reads the diffusers/PEFT and kohya layouts)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    if reader is None:
        from diffusers import StableDiffusionXLPipeline

        reader = StableDiffusionXLPipeline.lora_state_dict
    try:
        state, alphas = reader(raw)
    except (ValueError, KeyError, RuntimeError, AssertionError) as exc:
        raise AdapterInvalid(f"adapter {name!r} is not a LoRA diffusers can read: {exc}") from None
    lead = f"{prefix}."
    own = {k.removeprefix(lead): v for k, v in state.items() if k.startswith(lead)}
    if len(own) < len(state):
        log.warning("adapter %s: text-encoder weights left out (%s only)", name, prefix)
    peft = convert_unet_state_dict_to_peft(own)
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
            raise AdapterInvalid(f"adapter {name!r}: {path} is not a linear LoRA pair")
        layers[path] = (a, b, alpha_of.get(path))
    if not layers:
        raise AdapterInvalid(f"adapter {name!r} has no {prefix} LoRA weights")
    return layers
