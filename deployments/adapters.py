"""LoRA adapters on a replica: fixed slots in the denoiser (SDXL's UNet, FLUX's
transformer), filled and switched in place.

At start every targeted layer gets `capacity` LoRA slots of `max_rank`
(`deployments.lora_slots`), put around what computes it once the speed settings are
applied, so no module is injected or removed while serving:

- `read` (any thread): the file's tensors, converted to PEFT keys, checked against the
  slots' shapes and staged in (pinned) CPU memory (`deployments.lora_files`).
- `inject` (pipeline thread, between calls): copy those tensors into a free or least
  recently used slot — a device copy, no module surgery.
- `activate_call` (pipeline thread): give each request of a call its set's slots and
  scales — a small index tensor; switching between held adapters reloads nothing, and
  requests with different sets share one call.

`adapter_store` picks these slots, or adapters merged into the weights per call
(`deployments.fused_adapters`, the model's `fuse_adapters`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch

from deployments.engines.withdrawal import BatchRows
from deployments.fused_adapters import FusedAdapters, HeldAdapters, targeted
from deployments.lora_files import AdapterWeights, LoraReader, Target, read_adapter
from deployments.lora_slots import SlotLinear, SlotRouting, slot_widths, wrap_targets
from serve.adapters import AdapterEntry, AdapterSet


class AdapterSlots(HeldAdapters):
    """An LRU of adapters held in `capacity` slots of every targeted layer of one
    denoiser (`deployments.lora_slots`); rows of one call may use different sets.

    `prefix` is the denoiser's key prefix in LoRA files ("unet", "transformer"); `reader`
    reads the family's layouts. The slot layers are put in by `bind`, after the speed
    settings, around what computes each target then (fused QKV rows, FP8 layers alike).
    """

    rewrites = 0  # slots never rewrite the denoiser's weights (see FusedAdapters)
    mixes_sets = True  # one call may run requests with different adapter sets

    def __init__(self, denoiser, catalog: Mapping[str, AdapterEntry] | None, capacity: int,
                 max_rank: int, targets: Sequence[str], prefix: str = "unet",
                 reader: LoraReader | None = None,
                 encoders: Mapping[str, torch.nn.Module] | None = None):
        self._catalog = catalog if catalog is not None else {}
        self._capacity, self._max_rank = capacity if catalog is not None else 0, max_rank
        self._hold_text(encoders, self._capacity)
        self._paths = [path for path, m in denoiser.named_modules()
                       if catalog is not None and isinstance(m, torch.nn.Linear)
                       and targeted(path, targets)]
        self._prefix, self._reader = prefix, reader
        self._layers: dict[str, tuple[SlotLinear, int]] = {}
        self._held: OrderedDict[str, int] = OrderedDict()  # adapter name → slot
        self._routing = SlotRouting(self._capacity)

    def bind(self, denoiser, compiled: bool = False) -> None:
        """Put the slot layers around what computes each target in `denoiser` now;
        `compiled`: the denoiser's blocks are compiled, so calls pad each row's adapters
        up to one of a few counts (`slot_widths`)."""
        if self._layers or not self._paths:
            return
        self._layers = wrap_targets(denoiser, self._paths, self._capacity, self._max_rank,
                                    denoiser.dtype)
        self._routing.attach(denoiser, {layer for layer, _ in self._layers.values()})
        self._routing.widths = slot_widths(self._capacity) if compiled else ()

    def read(self, name: str) -> AdapterWeights:
        """Stage the adapter's tensors. Raises AdapterInvalid if it cannot fill a slot."""
        return read_adapter(self._catalog[name], self._reader, self._prefix, self._max_rank,
                            self._target, self._encoders)

    def inject(self, name: str, weights: AdapterWeights, keep: tuple[str, ...] = ()) -> None:
        """Copy staged weights into a free slot or the least recently used one not in
        `keep` (the text-encoder parts are held apart). Raises AdapterInvalid when every
        slot is needed by `keep`."""
        self.text.hold(name, weights.text)
        if name in self._held:
            self._held.move_to_end(name)
            return
        slot = self._free_slot(keep)
        for path, (layer, part) in self._layers.items():
            layer.fill(slot, part, weights.layers.get(path))
        self._held[name] = slot

    def activate(self, adapters: AdapterSet) -> None:
        """Make exactly `adapters` (with their scales) active for every row; load any that
        are missing."""
        self.activate_call([adapters], BatchRows([1]))

    def activate_call(self, sets: Sequence[AdapterSet], rows: BatchRows) -> None:
        """Give each request of a call (`sets`, one per request, whose images are `rows`)
        its adapter set; load any that are missing, keeping all the call's. Raises
        AdapterInvalid when the call names more adapters than the slots hold."""
        self._hold(tuple(dict.fromkeys(n for s in sets for n in s.names)))
        self._routing.route([[(self._held[n], scale) for n, scale in s.items] for s in sets],
                            rows)

    def primings(self) -> list[AbstractContextManager]:
        """Compiled: one context per adapter count calls are padded up to, in which calls
        without adapters run the slot layers as calls with that many adapters per row do
        (on the all-zero slot), so that warm-up compiles their code too."""
        return [self._priming(width) for width in self._routing.widths]

    @contextmanager
    def _priming(self, width: int) -> Iterator[None]:
        self._routing.primed = width
        try:
            yield
        finally:
            self._routing.primed = 0

    def _target(self, path: str) -> Target | None:
        found = self._layers.get(path)
        if found is None:
            return None
        layer = found[0]
        return Target(layer.in_features, layer.out_features // layer.parts,
                      layer.lora_a.dtype, layer.lora_a.is_cuda)

    def _free_slot(self, keep: tuple[str, ...]) -> int:
        used = set(self._held.values())
        for slot in range(self._capacity):
            if slot not in used:
                return slot
        return self._held.pop(self._least_recent(keep))


def adapter_store(denoiser, catalog: Mapping[str, AdapterEntry] | None, capacity: int,
                  max_rank: int, targets: Sequence[str], prefix: str = "unet",
                  reader: LoraReader | None = None, fuse: bool = False,
                  encoders: Mapping[str, torch.nn.Module] | None = None,
                  ) -> AdapterSlots | FusedAdapters:
    """The denoiser's adapters: merged into its weights per call (`fuse`), or in LoRA slots
    that run beside its layers; their parts for the text `encoders` (by key prefix in LoRA
    files) apply while prompts are encoded. `catalog` None: the model takes no adapters
    (no slots, no weight copy); a mapping, even empty, may gain entries later (adapters
    given by URL)."""
    store = FusedAdapters if fuse else AdapterSlots
    return store(denoiser, catalog, capacity, max_rank, targets, prefix, reader, encoders)
