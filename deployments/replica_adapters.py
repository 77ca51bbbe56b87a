"""A model replica's LoRA adapter sets: files given by URL downloaded, the set's adapters
read and checked, then made resident through Serve's multiplexing, which reports the sets
each replica holds so that the router sends a set's requests where it is."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING

from ray import serve

from deployments.lora_downloads import AdapterDownloads
from serve.adapters import AdapterEntry, AdapterInvalid, AdapterSet
from serve.config import ModelConfig

if TYPE_CHECKING:
    from deployments.adapters import AdapterSlots
    from deployments.fused_adapters import FusedAdapters
    from deployments.lora_files import AdapterWeights


_DOWNLOADS = 4  # LoRA files a replica downloads at once


class ReplicaAdapters:
    """`slots` are the engine's (in slots or merged); files are read on `workers`, and
    injected on `pipeline`, between calls. Adapters given by URL join `catalog` as they
    are downloaded."""

    def __init__(self, cfg: ModelConfig, slots: AdapterSlots | FusedAdapters,
                 catalog: dict[str, AdapterEntry], downloads: AdapterDownloads | None,
                 workers: Executor, pipeline: Executor):
        self.cfg, self.slots, self.catalog, self.downloads = cfg, slots, catalog, downloads
        self._workers, self._pipeline = workers, pipeline
        # Downloads wait on other hosts, for as long as those take: they get threads of
        # their own, so that a slow host never holds up the workers, which finish every
        # request's images.
        self._fetching = (ThreadPoolExecutor(_DOWNLOADS, thread_name_prefix="lora-downloads")
                          if downloads is not None else None)
        self._staged: dict[str, dict[str, AdapterWeights]] = {}  # by set key, for the loader

        async def load_adapter_set(key: str) -> AdapterSet:
            return await self._load(AdapterSet.from_key(key))

        self._resident: Callable[[str], Awaitable[AdapterSet]] = serve.multiplexed(
            max_num_models_per_replica=cfg.max_loaded_adapters)(load_adapter_set)

    async def hold(self, adapters: AdapterSet) -> bool:
        """Make the set resident, downloading adapters given by URL first; whether it was
        held already. Raises AdapterInvalid for an adapter that cannot be used."""
        held = all(name in self.slots.loaded for name in adapters.names)
        await self._download(adapters)
        # Read (and so check) the adapters not held before Serve's loader takes the set: a
        # file that cannot be used is refused here, where Serve does not log it as a
        # failed load.
        self._staged[adapters.key] = await self._read(adapters)
        try:
            await self._resident(adapters.key)
            # A set Serve still counted as held, whose adapters other sets displaced from
            # the slots since, gets them back as read (its loader did not run).
            await self._load(adapters)
        finally:
            self._staged.pop(adapters.key, None)
        return held

    async def _download(self, adapters: AdapterSet) -> None:
        """Add the set's adapters given by URL to the catalog, downloading those not on
        this node yet."""
        if not adapters.urls:
            return
        if self.downloads is None:
            raise AdapterInvalid("this server downloads no LoRA files for this model "
                                 "(lora_allowed_hosts, speed settings)")
        loop = asyncio.get_running_loop()
        await self.downloads.add(adapters.urls, self.catalog, self.slots.loaded, self.cfg,
                                 lambda *a: loop.run_in_executor(self._fetching, *a))

    async def _read(self, adapters: AdapterSet) -> dict[str, AdapterWeights]:
        """The set's adapters that are not held, read off the pipeline thread."""
        loop = asyncio.get_running_loop()
        return {name: await loop.run_in_executor(self._workers, self.slots.read, name)
                for name in adapters.names if name not in self.slots.loaded}

    async def _load(self, adapters: AdapterSet) -> AdapterSet:
        """Inject the set's missing adapters between calls (Serve's loader, and `hold`
        after it), as `hold` read them, or read again if another set displaced them since."""
        loop = asyncio.get_running_loop()
        staged = self._staged.get(adapters.key, {})
        for name in adapters.names:
            if name in self.slots.loaded:
                continue
            state = staged.get(name) or await loop.run_in_executor(
                self._workers, self.slots.read, name)
            await loop.run_in_executor(self._pipeline, self.slots.inject, name, state,
                                       tuple(adapters.names))
        return adapters
