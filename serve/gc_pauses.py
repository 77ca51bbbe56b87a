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

The timing callback runs inside the collection, which may have interrupted any code of
any thread, a `ContextVar.set` among them; so it only notes the time, and a thread of
its own hands the figures to the histogram. Observing a Ray Serve metric there crashes
replicas under load: Serve's metrics set a ContextVar when it is unset
(`_get_serve_request_context`), and a set made while another set's tree update is under
way frees the tree that update still walks (CPython gh-148891: MemoryError, then SIGSEGV).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from typing import Protocol


class Observer(Protocol):
    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...


log = logging.getLogger("ray.serve.atelier.gc")
_watched: list[Observer] = []  # one watcher per process, whatever the replicas in it
_paused = [0.0]  # seconds of collection since the watcher was installed


def settle() -> dict:
    """Collect everything start-up left, then freeze what remains out of later
    collections' reach. Returns the seconds it took and the objects frozen."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    return {"seconds": time.perf_counter() - started, "frozen": gc.get_freeze_count()}


def watch(pauses: Observer, every_s: float = 1.0) -> None:
    """Time every collection of this process into `pauses` (seconds, tag `generation`),
    observed by a thread of its own every `every_s`; a second call in the same process
    changes nothing."""
    if _watched:
        return
    _watched.append(pauses)
    started, noted = [0.0], deque()  # (generation, seconds) not yet observed

    def timed(phase: str, info: dict) -> None:  # inside the collection: note, nothing more
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            seconds = time.perf_counter() - started[0]
            _paused[0] += seconds
            noted.append((info["generation"], seconds))

    gc.callbacks.append(timed)
    threading.Thread(target=_observe_every, args=(pauses, noted, every_s), daemon=True,
                     name="atelier-gc-pauses").start()


def _observe_every(pauses: Observer, noted: deque, every_s: float) -> None:
    while True:
        time.sleep(every_s)
        while noted:
            generation, seconds = noted.popleft()
            try:
                pauses.observe(seconds, {"generation": str(generation)})
            except Exception:  # a figure lost, not the figures after it
                log.exception("could not record a garbage collection's pause")


def paused_s() -> float:
    """Seconds this process has spent in garbage collection since `watch` (0 before):
    the difference over a request's stay is what collections held it up."""
    return _paused[0]
