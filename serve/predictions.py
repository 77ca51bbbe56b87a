"""Replicate-style predictions: their state, where it is kept, and the tasks that run them.

State (predictions, output files, cancel requests) lives in a `StateStore`: in the ingress
replica's memory (single-node default) or in Redis (shared by every ingress replica, and
surviving their restarts). A prediction runs as an asyncio task in the replica that took
it; that task watches for a cancel request, which any replica may record.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from serve.files import StoredFile

TERMINAL = ("succeeded", "failed", "canceled", "aborted")
CANCEL_POLL_S = 0.1


def now_iso() -> str:
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
    created_at: str = field(default_factory=now_iso)
    started_at: str | None = None
    completed_at: str | None = None
    metrics: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def finish(self, status: str, output: Any = None, error: str | None = None) -> None:
        self.status, self.output, self.error = status, output, error
        self.completed_at = now_iso()
        self.metrics["total_time"] = round(time.time() - self.created, 3)

    def to_state(self) -> dict:
        return asdict(self)

    def to_json(self, base_url: str) -> dict:
        url = f"{base_url}/v1/predictions/{self.id}"
        body = {k: v for k, v in asdict(self).items() if k != "created"}
        return {**body, "urls": {"get": url, "cancel": f"{url}/cancel"}}


class StateStore(Protocol):
    """Where predictions, output files and cancel requests are kept."""

    async def save(self, prediction: Prediction) -> None: ...
    async def load(self, prediction_id: str) -> Prediction | None: ...
    async def page(self, after: str | None, limit: int) -> tuple[list[Prediction], str | None]:
        """Newest first, after the prediction id `after`; also the next cursor."""
    async def put_file(self, data: bytes, media_type: str) -> str: ...
    async def get_file(self, name: str) -> StoredFile | None: ...
    async def request_cancel(self, prediction_id: str) -> None: ...
    async def cancel_requested(self, prediction_id: str) -> bool: ...


class PredictionRunner:
    """Runs predictions taken by this ingress replica; cancels them on request."""

    def __init__(self, store: StateStore):
        self.store = store
        self._tasks: dict[str, asyncio.Task] = {}

    async def start(self, prediction: Prediction,
                    run: Callable[[Prediction], Awaitable[None]]) -> None:
        await self.store.save(prediction)
        task = asyncio.get_running_loop().create_task(run(prediction))
        self._tasks[prediction.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(prediction.id, None))

    async def wait(self, prediction_id: str, timeout_s: float) -> None:
        task = self._tasks.get(prediction_id)
        if task is not None:
            await asyncio.wait([task], timeout=timeout_s)

    async def cancel(self, prediction: Prediction) -> None:
        """End an unfinished prediction as canceled, whichever replica runs it."""
        if prediction.done:
            return
        await self.store.request_cancel(prediction.id)
        prediction.finish("canceled")
        await self.store.save(prediction)
        task = self._tasks.get(prediction.id)
        if task is not None:  # ours: withdraw it now rather than at the next poll
            task.cancel()

    async def until_canceled(self, prediction_id: str) -> None:
        """Return once a cancel has been requested for the prediction (from any replica)."""
        while not await self.store.cancel_requested(prediction_id):
            await asyncio.sleep(CANCEL_POLL_S)
