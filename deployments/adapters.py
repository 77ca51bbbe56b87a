"""LoRA adapters on a replica: read from disk, inject into the pipeline, switch, evict.

Reading a file (`read`) touches only the disk and CPU memory, so it runs off the pipeline
thread; `inject`, `activate` and eviction change the pipeline's modules and run on the
pipeline thread, between pipeline calls. Switching between adapters already held sets
scales only; no weights are reloaded.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping

from safetensors import SafetensorError
from safetensors.torch import load_file

from serve.adapters import AdapterEntry, AdapterInvalid, AdapterSet

log = logging.getLogger("atelier.adapters")


class AdapterSlots:
    """An LRU of adapters loaded into one pipeline, at most `capacity` at a time."""

    def __init__(self, pipe, catalog: Mapping[str, AdapterEntry], capacity: int):
        self._pipe, self._catalog, self._capacity = pipe, catalog, capacity
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._active: AdapterSet | None = AdapterSet()
        self.loads = 0
        self.last_load_s = 0.0

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def read(self, name: str) -> dict:
        """The adapter's tensors from its catalogued file. Raises AdapterInvalid."""
        entry = self._catalog[name]
        try:
            return load_file(entry.path, device="cpu")
        except (OSError, SafetensorError, ValueError) as exc:
            raise AdapterInvalid(f"adapter {name!r} cannot be read: {exc}") from None

    def inject(self, name: str, state: dict, keep: tuple[str, ...] = ()) -> None:
        """Load `state` as adapter `name`, first unloading least recently used adapters
        (never those in `keep`). Raises AdapterInvalid and leaves no trace on failure."""
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        started = time.perf_counter()
        while len(self._loaded) >= self._capacity:
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                break
            self._unload(victim)
        try:
            self._pipe.load_lora_weights(state, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as exc:
            self._discard(name)
            raise AdapterInvalid(f"adapter {name!r} does not fit this model: "
                                 f"{type(exc).__name__}") from None
        self._loaded[name] = None
        self._active = None  # diffusers activates a newly loaded adapter on its own
        self.loads += 1
        self.last_load_s = time.perf_counter() - started
        log.info("loaded adapter %s in %.1f ms", name, self.last_load_s * 1000)

    def activate(self, adapters: AdapterSet) -> None:
        """Make exactly `adapters` (with their scales) active; load any that are missing."""
        for name in adapters.names:
            if name not in self._loaded:
                self.inject(name, self.read(name), keep=tuple(adapters.names))
            self._loaded.move_to_end(name)
        if adapters == self._active:
            return
        if adapters:
            self._pipe.enable_lora()
            self._pipe.set_adapters(adapters.names, adapters.scales)
        elif self._loaded:
            self._pipe.disable_lora()
        self._active = adapters

    def _unload(self, name: str) -> None:
        self._pipe.delete_adapters(name)
        del self._loaded[name]
        self._active = None
        log.info("unloaded adapter %s", name)

    def _discard(self, name: str) -> None:
        """Remove whatever a failed load left behind."""
        try:
            self._pipe.delete_adapters(name)
        except (ValueError, KeyError, AttributeError):
            pass  # nothing was injected under that name
        self._active = None
