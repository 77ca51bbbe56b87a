"""Dynamic batching: gather compatible requests that arrive close together into one call.

The oldest waiting request of the highest priority runs next (with one priority, as by
default, the oldest: no starvation). Its batch takes the other requests with the same
key, higher priorities first and in arrival order within one, up to `max_batch_size`
images (and, where requests name what the call must hold for them, such as LoRA adapters,
up to `max_held` such names), and waits at most `wait_s` from its first request's arrival
for more company. Requests with other keys keep their places for the following batches.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ray.serve.atelier.batcher")

# runner(requests, withdrawn, on_step, on_preview): `withdrawn()`, callable from any
# thread, gives the indexes of the call's requests that were withdrawn since it started, so
# a long call can drop them or stop early; `on_step(step, total)`, callable from any
# thread, reports progress to the requests that asked for it; `on_preview(index, images)`
# hands request `index` its partial images.
StepListener = Callable[[int, int], None]
PreviewListener = Callable[[int, Any], None]
Runner = Callable[[Sequence[Any], Callable[[], set[int]], StepListener, PreviewListener],
                  Awaitable[Sequence[Any]]]


@dataclass(frozen=True)
class Batched:
    """A request's result with how its batch was formed and timed."""

    result: Any
    batch_id: str
    batch_images: int
    batch_requests: int
    queue_s: float
    run_s: float


@dataclass(eq=False)
class _Pending:
    request: Any
    key: Hashable
    size: int
    enqueued: float
    future: asyncio.Future = field(repr=False)
    holds: frozenset = frozenset()
    on_step: StepListener | None = None
    on_preview: Callable[[Any], None] | None = None
    priority: int = 0

    @property
    def order(self) -> tuple[int, float]:
        """Sorts before the requests it runs before: higher priority, then older."""
        return -self.priority, self.enqueued


class Batcher:
    """Submit requests, await their results; cancelling the awaiting task withdraws one.

    `runner` receives a list of compatible requests and returns one result per request,
    in order. If it raises for a batch of several, the batch is split in two halves that
    run again, down to single requests: a batch too large for the device's memory runs as
    smaller batches, and only a request that fails alone gets the error. A request
    withdrawn while its call runs gets no result, and `withdrawn()` names it to the runner.
    """

    def __init__(self, runner: Runner, max_batch_size: int, wait_s: float, name: str = "b",
                 on_depth: Callable[[int], None] | None = None, idle_s: float | None = None,
                 on_idle: Callable[[], Awaitable[None]] | None = None,
                 max_held: int | None = None):
        """`on_depth(n)` hears the number of waiting requests whenever it changes.
        `on_idle()` is awaited after every `idle_s` without a request (keeping the device
        warm); a request arriving meanwhile runs once it returns. `max_held`: the most distinct
        names (`submit`'s `holds`) one batch's requests may have together (None: no limit)."""
        if max_batch_size < 1 or wait_s < 0 or (idle_s is not None and idle_s <= 0):
            raise ValueError("max_batch_size must be >= 1, wait_s >= 0 and idle_s > 0")
        self._runner, self._max, self._wait_s, self._name = runner, max_batch_size, wait_s, name
        self._on_depth = on_depth or (lambda n: None)
        self._idle_s, self._on_idle = (idle_s, on_idle) if on_idle else (None, None)
        self._max_held = max_held
        self._pending: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._ids = itertools.count(1)
        self.running_since: float | None = None
        self._running: list[_Pending] = []

    @property
    def queued(self) -> int:
        return len(self._pending)

    def fail_all(self, exc: Exception) -> None:
        """Answer every waiting request and the running call's with `exc` (the replica is
        being given up); the running call sees them all withdrawn."""
        for item in [*self._pending, *self._running]:
            _settle(item.future, exc=exc)
        self._pending.clear()
        self._on_depth(0)

    async def submit(self, request: Any, key: Hashable, size: int = 1,
                     on_step: StepListener | None = None,
                     on_preview: Callable[[Any], None] | None = None,
                     holds: frozenset = frozenset(), priority: int = 0) -> Batched:
        """Queue `request` (taking `size` images of a batch, needing the names in `holds`
        held by its call, run before waiting requests of lower `priority`) and return its
        result.

        `on_step(step, total)` is called on this event loop as its call progresses, and
        `on_preview(images)` with each of its partial images.
        """
        self.start()
        item = _Pending(request, key, size, time.monotonic(),
                        asyncio.get_running_loop().create_future(), holds, on_step, on_preview,
                        priority)
        self._pending.append(item)
        self._on_depth(len(self._pending))
        self._wakeup.set()
        try:
            return await item.future
        except asyncio.CancelledError:
            if item in self._pending:
                self._pending.remove(item)
                self._on_depth(len(self._pending))
            raise

    def start(self) -> None:
        """Start the batching task on the running event loop, if not running (submit does
        it too; call it early for `on_idle` to run before the first request)."""
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            self._wakeup.clear()
            if not self._pending:
                await self._idle()
                continue
            batch = self._select()
            images = sum(p.size for p in batch)
            remaining = batch[0].enqueued + self._wait_s - time.monotonic()
            if images < self._max and remaining > 0:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    pass
                continue
            for item in batch:
                self._pending.remove(item)
            self._on_depth(len(self._pending))
            await self._run(batch)

    async def _idle(self) -> None:
        """Wait for a request; past `idle_s` without one, run `on_idle` first."""
        if self._idle_s is None:
            await self._wakeup.wait()
            return
        try:
            await asyncio.wait_for(self._wakeup.wait(), self._idle_s)
        except TimeoutError:
            await self._on_idle()

    def _select(self) -> list[_Pending]:
        """The request to run next and the compatible ones that fit, in their order."""
        head, *others = sorted(self._pending, key=lambda p: p.order)
        batch, images, held = [head], head.size, head.holds
        for item in others:
            if item.key != head.key:
                continue
            if images + item.size > self._max:
                break
            if self._max_held is not None and len(held | item.holds) > self._max_held:
                continue
            batch.append(item)
            images += item.size
            held |= item.holds
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        self.running_since, self._running = started, batch
        batch_id = f"{self._name}-{next(self._ids)}"
        try:
            results = await self._runner([p.request for p in batch],
                                         lambda: {i for i, p in enumerate(batch)
                                                  if p.future.done()},
                                         _fan_out(batch, asyncio.get_running_loop()),
                                         _hand_previews(batch, asyncio.get_running_loop()))
        except Exception as exc:  # noqa: BLE001 - any failure: split the batch, answer the rest
            self.running_since, self._running = None, []
            if len(batch) == 1:
                _settle(batch[0].future, exc=exc)
                return
            reason = type(exc).__name__
        else:
            self.running_since, self._running = None, []
            run_s = time.monotonic() - started
            images = sum(p.size for p in batch)
            for item, result in zip(batch, results, strict=True):
                _settle(item.future, Batched(result, batch_id, images, len(batch),
                                             started - item.enqueued, run_s))
            return
        # Retried only now that the error (and the memory its traceback may hold) is gone.
        await self._retry_in_halves(batch, reason)

    async def _retry_in_halves(self, batch: list[_Pending], reason: str) -> None:
        """Run a failed batch again as two halves, without its withdrawn requests."""
        live = [item for item in batch if not item.future.done()]
        if len(live) <= 1:
            if live:
                await self._run(live)
            return
        middle = _middle(live)
        log.warning("a call of %d requests failed (%s); retrying as %d + %d",
                    len(live), reason, middle, len(live) - middle)
        await self._run(live[:middle])
        rest = [item for item in live[middle:] if not item.future.done()]
        if rest:
            await self._run(rest)


def _middle(batch: list[_Pending]) -> int:
    """Where to cut a batch so that both halves hold about as many images."""
    total, images = sum(p.size for p in batch), 0
    for i, item in enumerate(batch[:-1]):
        images += item.size
        if images * 2 >= total:
            return i + 1
    return len(batch) - 1


def _fan_out(batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> StepListener:
    listeners = [p for p in batch if p.on_step is not None]

    def on_step(step: int, total: int) -> None:
        for p in listeners:
            if not p.future.done():
                loop.call_soon_threadsafe(p.on_step, step, total)

    return on_step


def _hand_previews(batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> PreviewListener:
    def on_preview(index: int, images: Any) -> None:
        item = batch[index] if 0 <= index < len(batch) else None
        if item is not None and item.on_preview is not None and not item.future.done():
            loop.call_soon_threadsafe(item.on_preview, images)

    return on_preview


def _settle(future: asyncio.Future, value: Any = None, exc: BaseException | None = None) -> None:
    if future.done():  # the client went away meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)
