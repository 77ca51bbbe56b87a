"""Replicate-style predictions: their state, where it is kept, and the tasks that run them.

State (predictions, output files, uploaded input files, cancel requests) lives in a
`StateStore`: in the ingress replica's memory (single-node default) or in Redis (shared by
every ingress replica, and surviving their restarts). A prediction runs as an asyncio task
in the replica that took it; that task watches for a cancel request, which any replica
may record.

Nothing accepted is lost with an ingress replica: the replica running an unfinished
prediction holds a lease on it in the store and renews it every few seconds. When the
replica stops (redeploy, crash, node loss), its leases lapse, or are given back at once on
a clean stop, and another replica (or the one Serve starts instead) adopts the
predictions and runs them again from their stored input and seed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from serve.errors import Overloaded, StoreUnavailable
from serve.files import StoredFile
from serve.rate_limits import RateLimited
from serve.uploads import Upload

TERMINAL = ("succeeded", "failed", "canceled", "aborted")
CANCEL_POLL_S = 0.1
LEASE_S = 15.0  # an unfinished prediction whose lease is this old is adopted elsewhere

log = logging.getLogger("ray.serve.atelier.predictions")


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def owner_of(private: dict) -> str:
    """The name of the API key that made a prediction, from its private state ("open" on a
    server without keys)."""
    return private.get("client") or "open"


def new_prediction_id() -> str:
    return secrets.token_hex(13)


@dataclass
class Prediction:
    model: str
    version: str
    input: dict
    id: str = field(default_factory=new_prediction_id)
    status: str = "starting"
    output: Any = None
    error: str | None = None
    logs: str = ""
    created_at: str = field(default_factory=now_iso)
    started_at: str | None = None
    completed_at: str | None = None
    metrics: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    # What running it again needs and the client does not see: the drawn seed, the base
    # URL, the webhook and its events, the Cancel-After deadline, the request id.
    private: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def owner(self) -> str:
        return owner_of(self.private)

    def finish(self, status: str, output: Any = None, error: str | None = None) -> None:
        self.status, self.output, self.error = status, output, error
        self.completed_at = now_iso()
        self.metrics["total_time"] = round(time.time() - self.created, 3)

    def to_state(self) -> dict:
        return asdict(self)

    def to_json(self, base_url: str) -> dict:
        url = f"{base_url}/v1/predictions/{self.id}"
        body = {k: v for k, v in asdict(self).items() if k not in ("created", "private")}
        return {**body, "urls": {"get": url, "cancel": f"{url}/cancel",
                                 "stream": f"{url}/stream"}}


class StateStore(Protocol):
    """Where predictions, output files, cancel requests and leases are kept. Saving an
    unfinished prediction lists it as running, and among its key's unfinished ones;
    saving a finished one unlists it and drops its lease. A finished prediction stays
    finished: saving it as unfinished afterwards (a run's progress, saved as another
    replica cancels it) is ignored."""

    async def save(self, prediction: Prediction) -> None: ...
    async def load(self, prediction_id: str) -> Prediction | None: ...
    async def page(self, after: str | None, limit: int, owner: str | None = None,
                   ) -> tuple[list[Prediction], str | None]:
        """Newest first, after the prediction id `after` (of `owner`'s, the API key name
        its `private["client"]` holds, when given); also the next cursor."""
    async def put_file(self, data: bytes, media_type: str) -> str: ...
    async def get_file(self, name: str) -> StoredFile | None: ...
    async def put_upload(self, upload: Upload, data: bytes) -> None: ...
    async def get_upload(self, upload_id: str) -> Upload | None: ...
    async def upload_data(self, upload_id: str) -> bytes | None: ...
    async def upload_page(self, after: str | None, limit: int, owner: str | None = None,
                          ) -> tuple[list[Upload], str | None]:
        """Newest first, after the upload id `after` (of `owner`'s, the API key name
        that uploaded them, when given); also the next cursor."""
    async def delete_upload(self, upload: Upload) -> bool: ...
    async def shared_secret(self, name: str, make: Callable[[], str]) -> str:
        """The secret kept under `name`, made with `make()` by the first to ask."""
    async def take_token(self, bucket: str, limit: int, cost: int = 1) -> tuple[bool, float]:
        """Draw `cost` tokens from a bucket of `limit` refilled per minute: (drawn, left)."""
    async def request_cancel(self, prediction_id: str) -> None: ...
    async def cancel_requested(self, prediction_id: str) -> bool: ...
    async def cancels_requested(self, prediction_ids: list[str]) -> set[str]:
        """Those of the predictions that a cancel was requested for, in one call."""
    async def hold(self, owner: str, prediction_id: str, most: int) -> bool:
        """Count the prediction about to be made among the unfinished ones of the key named
        `owner` if they are fewer than `most` (at once for every replica); True if counted."""
    async def unhold(self, owner: str, prediction_id: str) -> None:
        """Stop counting a held prediction that was not made after all."""
    async def claim(self, prediction_id: str, owner: str, lease_s: float) -> bool:
        """Take the prediction's lease if nobody holds it; True if taken."""
    async def renew(self, prediction_ids: list[str], owner: str, lease_s: float) -> None: ...
    async def release(self, prediction_id: str) -> None:
        """Drop the lease, so that another replica adopts the prediction at once."""
    async def orphans(self) -> list[str]:
        """Running predictions that nobody holds a lease on."""
    async def ping(self) -> None:
        """Returns when the store answers (raises StoreUnavailable where it does not)."""


Run = Callable[[Prediction], Awaitable[None]]
ROOM_RETRY_S = 5  # Retry-After when there is no room for another unfinished prediction


class PredictionsFull(Overloaded):
    """The ingress replica runs `max_unfinished_predictions` already: retry later."""

    retry_after_s = ROOM_RETRY_S


class PredictionRunner:
    """Runs the predictions this ingress replica took or adopted; cancels them on
    request; `keep()` renews its leases and adopts orphans; `hand_over()` gives its
    unfinished predictions back when the replica stops."""

    def __init__(self, store: StateStore, owner: str, run: Run, lease_s: float = LEASE_S,
                 refused: Callable[[str], None] = lambda _: None):
        self.store, self.owner, self._run, self.lease_s = store, owner, run, lease_s
        self._refused = refused  # told the key name of each create refused with 429
        self._tasks: dict[str, asyncio.Task] = {}
        self._making = 0  # creates let in, not yet started or refused
        self._watched: dict[str, list[asyncio.Future]] = {}  # waits for a cancel, by id
        self._watcher: asyncio.Task | None = None
        self.handing_over = False

    @asynccontextmanager
    async def room(self, owner: str, key_max: int | None, most: int) -> AsyncIterator[str]:
        """Keep a place for one more prediction of the key named `owner` while it is made,
        and give the id it is to take. Refused with Retry-After where the replica runs or
        makes `most` already (503): each is a task here that keeps its input and polls the
        store; or where the key has `key_max` unfinished, on any replica (429)."""
        if len(self._tasks) + self._making >= most:
            raise PredictionsFull(f"this server runs {most} unfinished predictions already "
                                  "(max_unfinished_predictions); retry later")
        self._making += 1  # before the key's count is asked, which others may pass meanwhile
        try:
            prediction_id = new_prediction_id()
            if key_max is not None and not await self.store.hold(owner, prediction_id, key_max):
                self._refused(owner)
                raise RateLimited(f"{owner} has {key_max} unfinished predictions, its "
                                  "max_unfinished_predictions; send more as they finish",
                                  ROOM_RETRY_S)
            try:
                yield prediction_id
            except BaseException:
                if key_max is not None and prediction_id not in self._tasks:
                    await self._unhold(owner, prediction_id)
                raise
        finally:
            self._making -= 1

    async def _unhold(self, owner: str, prediction_id: str) -> None:
        try:
            await self.store.unhold(owner, prediction_id)
        except Exception:  # (StoreUnavailable among them) it counts until the store's TTL
            log.exception("a refused prediction still counts for %s", owner)

    async def start(self, prediction: Prediction) -> None:
        """Store a new prediction and run it here."""
        await self.store.claim(prediction.id, self.owner, self.lease_s)
        await self.store.save(prediction)
        self._spawn(prediction)

    def _spawn(self, prediction: Prediction) -> None:
        task = asyncio.get_running_loop().create_task(self._run(prediction))
        self._tasks[prediction.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(prediction.id, None))

    async def keep(self, count: Callable[[int], None] = lambda _: None) -> None:
        """Forever: renew this replica's leases, adopt predictions nobody holds, and give
        `count` the unfinished predictions here (creates being made among them)."""
        while True:
            count(len(self._tasks) + self._making)
            try:
                await self.store.renew(list(self._tasks), self.owner, self.lease_s)
                await self.adopt_orphans()
            except StoreUnavailable:  # (logged by the store) try again later
                pass
            except Exception:  # try again later
                log.exception("renewing leases or adopting predictions failed")
            await asyncio.sleep(self.lease_s / 3)

    async def adopt_orphans(self) -> list[str]:
        """Run here the unfinished predictions whose replica stopped; their ids."""
        adopted = []
        for prediction_id in await self.store.orphans():
            if self.handing_over or prediction_id in self._tasks:
                continue
            if not await self.store.claim(prediction_id, self.owner, self.lease_s):
                continue  # another replica was quicker
            prediction = await self.store.load(prediction_id)
            if prediction is None or prediction.done:
                await self.store.release(prediction_id)
                continue
            prediction.logs += ("The ingress replica running this prediction stopped; "
                                f"running it again on {self.owner}\n")
            log.info("adopted prediction %s", prediction_id,
                     extra={"prediction_id": prediction_id})
            self._spawn(prediction)
            adopted.append(prediction_id)
        return adopted

    async def hand_over(self) -> None:
        """Stop running predictions here and give their leases back, for another replica
        to adopt (the replica is stopping)."""
        self.handing_over = True
        tasks = dict(self._tasks)
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for prediction_id in tasks:
            await self.store.release(prediction_id)
        if tasks:
            log.info("handed over %d unfinished prediction(s)", len(tasks))

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
        """Return once a cancel has been requested for the prediction (from any replica).
        One loop asks the store about every watched prediction at once, each CANCEL_POLL_S,
        rather than each prediction asking on its own."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._watched.setdefault(prediction_id, []).append(waiter)
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._watch_cancels())
        try:
            await waiter
        finally:
            waiters = self._watched[prediction_id]
            waiters.remove(waiter)
            if not waiters:
                del self._watched[prediction_id]

    async def _watch_cancels(self) -> None:
        """While predictions are watched: end the wait of those with a cancel requested."""
        while self._watched:
            try:
                requested = await self.store.cancels_requested(list(self._watched))
            except StoreUnavailable:
                requested = set()  # (nor can a cancel be requested through it meanwhile)
            except Exception:  # try again at the next poll
                log.exception("reading cancel requests failed")
                requested = set()
            for prediction_id in requested:
                for waiter in self._watched.get(prediction_id, ()):
                    if not waiter.done():
                        waiter.set_result(None)
            await asyncio.sleep(CANCEL_POLL_S)
