"""A replica's adapter sets against a stand-in of Serve's multiplexing (which runs the
loader only for a set it does not count as held) and of the engine's slots: each adapter
is read off the pipeline thread, once per hold, and injected on it."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from deployments.replica_adapters import ReplicaAdapters
from serve.adapters import AdapterSet
from serve.config import default_config


class _Slots:
    """Holds `capacity` adapters; injecting another displaces the oldest not in use."""

    def __init__(self, capacity: int):
        self.capacity, self.loaded, self.reads, self.injected = capacity, {}, [], []

    def read(self, name):
        state = {"name": name, "read": len(self.reads)}
        self.reads.append((name, threading.current_thread().name))
        return state

    def inject(self, name, state, in_use):
        if len(self.loaded) >= self.capacity:
            del self.loaded[next(n for n in self.loaded if n not in in_use)]
        self.loaded[name] = state
        self.injected.append((name, state, threading.current_thread().name))


class _Multiplexed:
    """As Serve's multiplexing: the loader runs for a set not held, the least recently
    used of `held` sets making room."""

    def __init__(self, loader, held: int):
        self.loader, self.held, self.keys = loader, held, []

    async def __call__(self, key):
        if key in self.keys:
            self.keys.remove(key)
        else:
            if len(self.keys) >= self.held:
                self.keys.pop(0)
            await self.loader(AdapterSet.from_key(key))
        self.keys.append(key)


def test_a_set_serve_holds_whose_adapters_were_displaced_gets_back_what_was_read():
    config = default_config().models[0]
    slots = _Slots(capacity=2)
    with (ThreadPoolExecutor(2, thread_name_prefix="read") as workers,
          ThreadPoolExecutor(1, thread_name_prefix="pipeline") as pipeline):
        adapters = ReplicaAdapters(config, slots, {}, None, workers, pipeline)
        adapters._resident = _Multiplexed(adapters._load, held=3)
        sets = {n: AdapterSet.of([(n, 1.0)]) for n in "abc"}

        async def hold(*names):
            return [await adapters.hold(sets[n]) for n in names]

        assert asyncio.run(hold("a", "b", "c")) == [False, False, False]
        assert list(slots.loaded) == ["b", "c"]  # c displaced a; Serve still holds all three
        assert asyncio.run(hold("a")) == [False]  # the loader did not run for it
    assert list(slots.loaded) == ["c", "a"]
    assert [name for name, _ in slots.reads] == ["a", "b", "c", "a"]  # once per hold
    assert all(thread.startswith("read") for _, thread in slots.reads)
    assert [(name, state["read"]) for name, state, _ in slots.injected] == [
        ("a", 0), ("b", 1), ("c", 2), ("a", 3)]  # each as its hold read it
    assert all(thread.startswith("pipeline") for _, _, thread in slots.injected)
    assert adapters._staged == {}
