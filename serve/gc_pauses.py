"""Python's garbage collector in a serving process.

A collection holds the interpreter lock while it scans, so every thread of the replica
waits: the pipeline thread launches no kernel, the event loop answers nothing. A full
(generation 2) collection scans every tracked object of the process, and a replica holds
hundreds of thousands of them once torch, diffusers and Ray are loaded (more still with
compiled code): with the tiny engine warmed up on the 2-core CPU, a full collection
(440,000–500,000 objects) took 240–290 ms.

`settle` runs once a replica has started (warmed up): it collects what start-up left
and freezes the rest (`gc.freeze`), so later collections scan only objects made while
serving. `watch` times every collection into a histogram, by generation, and keeps
the running total (`paused_s`).
"""

from __future__ import annotations

import gc
import time
from typing import Protocol


class Observer(Protocol):
    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...


_watched: list[Observer] = []  # one watcher per process, whatever the replicas in it
_paused = [0.0]  # seconds of collection since the watcher was installed


def settle() -> dict:
    """Collect everything start-up left, then freeze what remains out of later
    collections' reach. Returns the seconds it took and the objects frozen."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    return {"seconds": time.perf_counter() - started, "frozen": gc.get_freeze_count()}


def watch(pauses: Observer) -> None:
    """Time every collection of this process into `pauses` (seconds, tag `generation`);
    a second call in the same process changes nothing."""
    if _watched:
        return
    _watched.append(pauses)
    started = [0.0]

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            seconds = time.perf_counter() - started[0]
            _paused[0] += seconds
            pauses.observe(seconds, {"generation": str(info["generation"])})

    gc.callbacks.append(timed)


def paused_s() -> float:
    """Seconds this process has spent in garbage collection since `watch` (0 before):
    the difference over a request's stay is what collections held it up."""
    return _paused[0]
