"""Admission of generation requests to a model's replicas, by priority.

Ray Serve holds a request a model's replicas have no room for in its handle's queue, in
arrival order: behind a batch job's queued requests, an interactive app's would wait for
all of them, and be refused when they filled the queue. So the ingress holds them itself:
each ingress replica lets through at most as many requests to a model as its replicas
hold at once (`replicas x max_ongoing_requests`), and the rest wait here, the oldest of the
highest priority (the API key's) going next. At most `max_queued_requests` wait; when they
are that many, a newcomer of higher priority takes the place of the newest of the lowest
priority waiting, which is refused as the model being busy (503, Retry-After), as a
newcomer of no higher priority is.

The capacity follows the model's running replicas (`resize`, serve.replicas): while a
replica is lost (its server down, its process being replaced) or an autoscaled model's
replica starts, the requests it would hold wait here by priority, not in Serve's queue. An
autoscaled replica's `max_ongoing_requests` is over the autoscaler's target, so full
replicas are what make it add one.

With several ingress replicas each lets through a whole model's share (so that an uneven
spread of clients over them never idles a GPU); what exceeds it waits in Serve's queue.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from serve.errors import Overloaded


@dataclass(order=True)
class _Waiter:
    rank: tuple[int, int]  # (-priority, arrival): the smallest goes first
    admitted: asyncio.Future = field(compare=False)


class Admission:
    """One model's admission at one ingress replica: `slot` holds a place among the
    `capacity` requests let through, waiting for one (among at most `max_waiting`) if
    they are all taken. `on_waiting` is told the number waiting whenever it changes."""

    def __init__(self, model: str, capacity: int, max_waiting: int,
                 on_waiting: Callable[[int], None] = lambda count: None):
        if capacity < 1 or max_waiting < 0:
            raise ValueError("capacity must be >= 1 and max_waiting >= 0")
        self.model, self.capacity, self.max_waiting = model, capacity, max_waiting
        self.running = 0
        self._waiting: list[_Waiter] = []  # a heap
        self._arrivals = itertools.count()
        self._on_waiting = on_waiting

    def resize(self, capacity: int) -> None:
        """Let through `capacity` at once from now on (at least one), as the model's
        running replicas change: with more, waiters go through now; with fewer, none goes
        until those running are under it."""
        self.capacity = max(1, capacity)
        self._admit()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def slot(self, priority: int = 0) -> AsyncIterator[None]:
        """Holds one of the places let through while the body runs; raises Overloaded if
        none is free and the request may not wait (or is pushed out while waiting)."""
        await self._enter(priority)
        try:
            yield
        finally:
            self.running -= 1
            self._admit()

    async def _enter(self, priority: int) -> None:
        if self.running < self.capacity and not self._waiting:
            self.running += 1
            return
        rank = (-priority, next(self._arrivals))
        if len(self._waiting) >= self.max_waiting:
            self._make_room(rank)
        waiter = _Waiter(rank, asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiting, waiter)
        self._admit()  # (a place may be free behind waiters withdrawn meanwhile)
        try:
            await waiter.admitted
        except asyncio.CancelledError:
            admitted = waiter.admitted
            if admitted.done() and not admitted.cancelled() and admitted.exception() is None:
                self.running -= 1  # let through as it was withdrawn: the place goes on
                self._admit()
            else:
                self._remove(waiter)
            raise

    def _make_room(self, rank: tuple[int, int]) -> None:
        """Push out the newest of the lowest priority waiting if it ranks below `rank`;
        else refuse the newcomer."""
        last = max(self._waiting, default=None)
        if last is None or last.rank[0] <= rank[0]:
            raise Overloaded(f"{self.model} is busy: {self.waiting} requests wait for its "
                             "replicas; retry later")
        self._remove(last)
        last.admitted.set_exception(Overloaded(
            f"{self.model} is busy: a request of higher priority took this one's place in "
            "its queue; retry later"))

    def _remove(self, waiter: _Waiter) -> None:
        if waiter in self._waiting:
            self._waiting.remove(waiter)
            heapq.heapify(self._waiting)
        self._admit()

    def _admit(self) -> None:
        """Let the first waiters through while places are free."""
        while self.running < self.capacity and self._waiting:
            waiter = heapq.heappop(self._waiting)
            if waiter.admitted.done():  # withdrawn (its task cancelled) before it went
                continue
            self.running += 1
            waiter.admitted.set_result(None)
        self._on_waiting(self.waiting)
