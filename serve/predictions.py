"""Replicate-style predictions: their state and the tasks that run them.

This store keeps predictions in the ingress replica's memory (the single-node default);
it is bounded by age and count. Each prediction runs as an asyncio task that calls the
model deployment; cancelling the task withdraws a queued request before it ever runs.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

TERMINAL = ("succeeded", "failed", "canceled")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Prediction:
    model: str
    version: str
    input: dict
    id: str = field(default_factory=lambda: secrets.token_hex(13))
    status: str = "starting"
    output: Any = None
    error: str | None = None
    logs: str = ""
    created_at: str = field(default_factory=_now_iso)
    started_at: str | None = None
    completed_at: str | None = None
    metrics: dict = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def finish(self, status: str, output: Any = None, error: str | None = None) -> None:
        self.status, self.output, self.error = status, output, error
        self.completed_at = _now_iso()
        self.metrics["total_time"] = round(time.monotonic() - self.created, 3)

    def to_json(self, base_url: str) -> dict:
        url = f"{base_url}/v1/predictions/{self.id}"
        return {"id": self.id, "model": self.model, "version": self.version,
                "input": self.input, "output": self.output, "error": self.error,
                "logs": self.logs, "status": self.status, "created_at": self.created_at,
                "started_at": self.started_at, "completed_at": self.completed_at,
                "metrics": self.metrics, "urls": {"get": url, "cancel": f"{url}/cancel"}}


class PredictionStore:
    """Predictions by id, newest last; at most `max_items`, each kept `ttl_s` after it ends."""

    def __init__(self, ttl_s: float, max_items: int = 10_000):
        self._ttl_s, self._max = ttl_s, max_items
        self._items: OrderedDict[str, Prediction] = OrderedDict()
        self._tasks: dict[str, asyncio.Task] = {}

    def start(self, prediction: Prediction,
              run: Callable[[Prediction], Awaitable[None]]) -> Prediction:
        """Store `prediction` and run `run(prediction)` as a task."""
        self._expire()
        self._items[prediction.id] = prediction
        task = asyncio.get_running_loop().create_task(run(prediction))
        self._tasks[prediction.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(prediction.id, None))
        return prediction

    def get(self, prediction_id: str) -> Prediction | None:
        return self._items.get(prediction_id)

    def page(self, after: str | None, limit: int) -> tuple[list[Prediction], str | None]:
        """Newest first, starting after the prediction id `after`; also the next cursor."""
        newest_first = list(reversed(self._items.values()))
        start = 0
        if after is not None:
            ids = [p.id for p in newest_first]
            start = ids.index(after) + 1 if after in ids else len(ids)
        page = newest_first[start:start + limit]
        more = start + limit < len(newest_first)
        return page, (page[-1].id if more and page else None)

    async def wait(self, prediction_id: str, timeout_s: float) -> None:
        task = self._tasks.get(prediction_id)
        if task is not None:
            await asyncio.wait([task], timeout=timeout_s)

    def cancel(self, prediction: Prediction) -> None:
        """End a prediction that has not finished as canceled; its request is withdrawn."""
        if prediction.done:
            return
        task = self._tasks.get(prediction.id)
        if task is not None:
            task.cancel()
        prediction.finish("canceled")

    def _expire(self) -> None:
        now = time.monotonic()
        for pid, p in list(self._items.items()):
            expired = p.done and now - p.created > self._ttl_s
            if expired or len(self._items) > self._max and p.done:
                del self._items[pid]
