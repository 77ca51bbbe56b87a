"""LoRA adapters on a replica: fixed slots in the denoiser (SDXL's UNet, FLUX's
transformer), filled and switched in place.

At start the denoiser gets `capacity` LoRA slots (PEFT layers of `max_rank` on the configured
target modules), so no module is ever injected or removed while serving:

- `read` (any thread): the file's tensors, converted to PEFT keys, checked against the
  slots' shapes and staged in (pinned) CPU memory (`deployments.lora_files`).
- `inject` (pipeline thread, between calls): copy those tensors into a free or least
  recently used slot — a device copy, no module surgery.
- `activate` (pipeline thread): point every LoRA layer at the slots of a set and set their
  scales — attribute writes only; switching between held adapters reloads nothing.

`adapter_store` picks these slots, or adapters merged into the weights per call
(`deployments.fused_adapters`, the model's `fuse_adapters`).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from deployments.fused_adapters import FusedAdapters, HeldAdapters
from deployments.lora_files import AdapterWeights, LoraReader, Target, read_adapter
from serve.adapters import AdapterEntry, AdapterSet


class AdapterSlots(HeldAdapters):
    """An LRU of adapters held in `capacity` preallocated LoRA slots of one denoiser.

    `prefix` is the denoiser's key prefix in LoRA files ("unet", "transformer"); `reader`
    reads the family's layouts.
    """

    rewrites = 0  # slots never rewrite the denoiser's weights (see FusedAdapters)

    def __init__(self, denoiser, catalog: Mapping[str, AdapterEntry] | None, capacity: int,
                 max_rank: int, targets: Sequence[str], prefix: str = "unet",
                 reader: LoraReader | None = None):
        self._catalog, self._max_rank = catalog if catalog is not None else {}, max_rank
        self._prefix, self._reader = prefix, reader
        self._slots = [f"slot{i}" for i in range(capacity)] if catalog is not None else []
        if self._slots:
            from peft import LoraConfig

            with warnings.catch_warnings():
                # PEFT warns from the second adapter on; several slots are the point.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
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

    def read(self, name: str) -> AdapterWeights:
        """Stage the adapter's tensors. Raises AdapterInvalid if it cannot fill a slot."""
        return read_adapter(self._catalog[name], self._reader, self._prefix, self._max_rank,
                            self._target)

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
        self._hold(adapters)
        if adapters == self._active:
            return
        slots = [self._held[n] for n in adapters.names]
        scaled = [(self._held[n], s, self._alphas[n]) for n, s in adapters.items]
        for i, layer in enumerate(self._layers.values()):
            layer._active_adapter = slots
            for slot, scale, alphas in scaled:
                layer.scaling[slot] = scale * alphas[i]
        self._active = adapters

    def _target(self, path: str) -> Target | None:
        layer = self._layers.get(path)
        if layer is None or not self._slots:
            return None
        slot_a, slot_b = layer.lora_A[self._slots[0]].weight, layer.lora_B[self._slots[0]].weight
        return Target(slot_a.shape[1], slot_b.shape[0], slot_a.dtype, slot_a.is_cuda)

    def _free_slot(self, keep: tuple[str, ...]) -> str:
        used = set(self._held.values())
        for slot in self._slots:
            if slot not in used:
                return slot
        return self._held.pop(self._least_recent(keep))


def adapter_store(denoiser, catalog: Mapping[str, AdapterEntry] | None, capacity: int,
                  max_rank: int, targets: Sequence[str], prefix: str = "unet",
                  reader: LoraReader | None = None,
                  fuse: bool = False) -> AdapterSlots | FusedAdapters:
    """The denoiser's adapters: merged into its weights per call (`fuse`), or in LoRA slots
    that run beside its layers. `catalog` None: the model takes no adapters (no slots, no
    weight copy); a mapping, even empty, may gain entries later (adapters given by URL)."""
    store = FusedAdapters if fuse else AdapterSlots
    return store(denoiser, catalog, capacity, max_rank, targets, prefix, reader)
