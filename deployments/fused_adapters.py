"""LoRA adapters merged into the denoiser's weights for the calls that use them.

The denoiser keeps its plain linear layers: no LoRA wrappers run in any call, so a call
with adapters runs at the base model's speed, compiled or not. Held adapters are kept on
the device at their own rank; the targeted weights are copied once at start, so the base
model is restored exactly (a copy, not a subtraction) whenever the set changes:

- `read` (any thread): as for slots (`deployments.lora_files`).
- `inject` (pipeline thread, between calls): move the staged tensors to the device.
- `activate` (pipeline thread): when the set differs from the merged one, restore the
  weights it changed and add `scale * alpha/rank * B @ A` of each adapter in the set.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager

import torch

from deployments.lora_files import AdapterWeights, LoraReader, Target, read_adapter
from deployments.lora_text import TextAdapters
from serve.adapters import AdapterEntry, AdapterInvalid, AdapterSet

log = logging.getLogger("ray.serve.atelier.adapters")


class HeldAdapters:
    """The LRU both adapter stores keep (`_held`: adapter name → what holds it), and what
    they do alike with it. A store supplies `read`, `inject` and `activate`; the
    adapters' text-encoder parts are held apart, for prompt encoding (`text`)."""

    _held: OrderedDict
    text: TextAdapters
    mixes_sets = False  # every request of a call must have the same adapter set

    def _hold_text(self, encoders: Mapping[str, torch.nn.Module] | None, capacity: int) -> None:
        """Hold the text-encoder parts of up to `capacity` adapters for `encoders` (by
        their key prefix in LoRA files; none: those parts are left out)."""
        self._encoders = dict(encoders or {}) if capacity else {}
        self.text = TextAdapters(self._encoders, lambda name: self.read(name).text, capacity)

    def activate_call(self, sets: Sequence[AdapterSet], rows) -> None:
        """Give each request of a call (one set per request, images `rows`) its adapter
        set: here they must all be the same one (raises ValueError otherwise)."""
        if any(s != sets[0] for s in sets):
            raise ValueError("these adapters serve one adapter set per call")
        self.activate(sets[0])

    def primings(self) -> list[AbstractContextManager]:
        """Contexts in which warm-up calls run the code that calls with adapters run, when
        that differs from the plain calls' code (none where adapters are merged)."""
        return []

    @property
    def loaded(self) -> list[str]:
        return list(self._held)

    def bind(self, denoiser, compiled: bool = False) -> None:
        """Find what to change in `denoiser` as the speed settings left it (`compiled`:
        its blocks are compiled)."""

    def _hold(self, names: tuple[str, ...]) -> None:
        """Load the adapters named that are not held yet, keeping all of them; mark all
        as used last."""
        for name in names:
            if name not in self._held:
                self.inject(name, self.read(name), keep=names)
            self._held.move_to_end(name)

    def _least_recent(self, keep: tuple[str, ...]) -> str:
        """The least recently used adapter outside `keep`, to make room. Raises
        AdapterInvalid when every one is needed by `keep`."""
        victim = next((n for n in self._held if n not in keep), None)
        if victim is None:
            raise AdapterInvalid(
                "more adapters in one request or call than this replica holds")
        log.info("unloading adapter %s", victim)
        return victim


def targeted(path: str, targets: Sequence[str]) -> bool:
    """Whether module `path` is one of `targets` (name suffixes, as PEFT matches them)."""
    return any(path == t or path.endswith(f".{t}") for t in targets)


class FusedAdapters(HeldAdapters):
    """An LRU of up to `capacity` adapters on the device; the active set is merged into
    the targeted linear layers' weights. Same protocol as `AdapterSlots`.

    Made before the speed settings, it copies the targeted layers' weights; `bind`, after
    them, finds what computes each targeted layer now: the layer itself, its rows of a
    fused QKV layer, or an FP8 layer (`speed.Fp8Linear`), whose rows are quantized again
    from the float weights with the adapters added (so the base comes back bit for bit).
    """

    def __init__(self, denoiser, catalog: Mapping[str, AdapterEntry] | None, capacity: int,
                 max_rank: int, targets: Sequence[str], prefix: str = "unet",
                 reader: LoraReader | None = None,
                 encoders: Mapping[str, torch.nn.Module] | None = None):
        self._catalog = catalog if catalog is not None else {}
        self._capacity, self._max_rank = capacity, max_rank
        self._hold_text(encoders, capacity if catalog is not None else 0)
        self._prefix, self._reader = prefix, reader
        with torch.no_grad():
            self._originals = {path: m.weight.detach().clone()
                               for path, m in denoiser.named_modules()
                               if catalog is not None and isinstance(m, torch.nn.Linear)
                               and targeted(path, targets)}
        self.bind(denoiser)
        self._held: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._merged = AdapterSet()
        self._changed: set[str] = set()  # layers whose weights hold a merged adapter
        self.rewrites = 0  # times the weights were restored and merged for another set

    def bind(self, denoiser, compiled: bool = False) -> None:
        """Find the layer and rows that compute each targeted layer in `denoiser` now."""
        from deployments.engines.speed import linear_rows

        rows = linear_rows(denoiser)
        self._parts = {path: rows[path] for path in self._originals}

    @property
    def original_bytes(self) -> int:
        """Device memory of the weight copy that restores the base model."""
        return sum(w.numel() * w.element_size() for w in self._originals.values())

    def read(self, name: str) -> AdapterWeights:
        """Stage the adapter's tensors. Raises AdapterInvalid if it does not fit."""
        return read_adapter(self._catalog[name], self._reader, self._prefix, self._max_rank,
                            self._target, self._encoders)

    def inject(self, name: str, weights: AdapterWeights, keep: tuple[str, ...] = ()) -> None:
        """Hold staged weights on the device, making room by dropping the least recently
        used adapter not in `keep`. Raises AdapterInvalid when all are needed by `keep`."""
        self.text.hold(name, weights.text)
        if name in self._held:
            self._held.move_to_end(name)
            return
        if len(self._held) >= self._capacity:
            del self._held[self._least_recent(keep)]
        layers = {}
        for path, (a, b, scale) in weights.layers.items():
            device = self._originals[path].device
            layers[path] = (a.to(device, non_blocking=True), b.to(device, non_blocking=True),
                            scale)
        self._held[name] = AdapterWeights(name, layers)

    def activate(self, adapters: AdapterSet) -> None:
        """Merge exactly `adapters` (with their scales) into the weights; load any that
        are missing. The base model's weights come back exactly for an empty set."""
        self._hold(tuple(adapters.names))
        if adapters == self._merged:
            return
        terms: dict[str, list] = {}  # layer path → [(A, B, factor)]
        for name, scale in adapters.items:
            for path, (a, b, alpha) in self._held[name].layers.items():
                terms.setdefault(path, []).append((a, b, scale * alpha))
        with torch.no_grad():
            for path in self._changed.union(terms):
                self._write(path, terms.get(path, []))
        self._changed, self._merged = set(terms), adapters
        self.rewrites += 1

    def _write(self, path: str, terms: list) -> None:
        """Set the weights computing layer `path` to its original plus each term's
        `factor * B @ A`."""
        layer, rows = self._parts[path]
        original = self._originals[path]
        fp8 = not isinstance(layer, torch.nn.Linear)
        # An FP8 layer is quantized from a float copy of this one layer's weights.
        weight = original.to(torch.float32, copy=True) if fp8 else layer.weight[rows]
        if not fp8:
            weight.copy_(original)
        for a, b, factor in terms:
            weight.addmm_(b.to(weight.dtype), a.to(weight.dtype), alpha=factor)
        if fp8:
            layer.set_rows(rows, weight)

    def _target(self, path: str) -> Target | None:
        weight = self._originals.get(path)
        if weight is None:
            return None
        return Target(weight.shape[1], weight.shape[0], weight.dtype, weight.is_cuda)
