"""The `StateStore` backend in this replica's memory (serve.redis_state holds the one in
Redis, for a cluster).

Both are bounded: predictions, files and uploads expire `ttl_s` after they were made; the
memory backend also caps the bytes of output files it keeps, and of uploads.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from serve.files import FileStore, StoredFile
from serve.predictions import TERMINAL, Prediction, owner_of
from serve.rate_limits import MemoryBuckets
from serve.uploads import Upload


class MemoryStore:
    def __init__(self, ttl_s: float, max_file_bytes: int, max_predictions: int = 10_000):
        self._ttl_s, self._max = ttl_s, max_predictions
        self._predictions: OrderedDict[str, dict] = OrderedDict()
        self._cancels: set[str] = set()
        self._running: set[str] = set()
        self._unfinished: dict[str, dict[str, float]] = {}  # by key name: id -> when saved
        self._leases: dict[str, tuple[str, float]] = {}  # id -> (owner, expiry)
        self._files = FileStore(ttl_s, max_file_bytes)
        self._upload_data = FileStore(ttl_s, max_file_bytes)
        self._uploads: dict[str, Upload] = {}
        self._secrets: dict[str, str] = {}
        self._buckets = MemoryBuckets()

    async def save(self, prediction: Prediction) -> None:
        stored = self._predictions.get(prediction.id)
        if stored and stored["status"] in TERMINAL and not prediction.done:
            return  # finished by another (a cancel): that stays
        self._predictions[prediction.id] = prediction.to_state()
        owners = self._unfinished.setdefault(prediction.owner, {})
        if prediction.done:
            self._running.discard(prediction.id)
            self._leases.pop(prediction.id, None)
            owners.pop(prediction.id, None)
        else:
            self._running.add(prediction.id)
            owners[prediction.id] = time.time()
        self._expire()

    async def load(self, prediction_id: str) -> Prediction | None:
        state = self._predictions.get(prediction_id)
        return Prediction(**state) if state else None

    async def page(self, after: str | None, limit: int, owner: str | None = None,
                   ) -> tuple[list[Prediction], str | None]:
        ids = [i for i, state in reversed(self._predictions.items())
               if owner in (None, owner_of(state["private"]))]
        shown, more = _page_of(ids, after, limit)
        page = [Prediction(**self._predictions[i]) for i in shown]
        return page, (page[-1].id if more and page else None)

    async def put_file(self, data: bytes, media_type: str) -> str:
        return self._files.put(data, media_type)

    async def get_file(self, name: str) -> StoredFile | None:
        return self._files.get(name)

    async def put_upload(self, upload: Upload, data: bytes) -> None:
        self._uploads[upload.id] = upload
        self._upload_data.put(data, upload.content_type, name=upload.id)
        for gone in [i for i in self._uploads if self._upload_data.get(i) is None]:
            del self._uploads[gone]  # expired, or dropped for the byte budget

    async def get_upload(self, upload_id: str) -> Upload | None:
        return self._uploads.get(upload_id) if await self.upload_data(upload_id) else None

    async def upload_data(self, upload_id: str) -> bytes | None:
        stored = self._upload_data.get(upload_id)
        if stored is None:
            self._uploads.pop(upload_id, None)
        return stored.data if stored else None

    async def upload_page(self, after: str | None, limit: int, owner: str | None = None,
                          ) -> tuple[list[Upload], str | None]:
        kept = [u for u in [await self.get_upload(i) for i in list(self._uploads)] if u]
        ids = [u.id for u in sorted(kept, key=lambda u: -u.created)
               if owner in (None, u.owner)]
        shown, more = _page_of(ids, after, limit)
        page = [self._uploads[i] for i in shown]
        return page, (page[-1].id if more and page else None)

    async def delete_upload(self, upload: Upload) -> bool:
        self._uploads.pop(upload.id, None)
        return self._upload_data.delete(upload.id)

    async def shared_secret(self, name: str, make: Callable[[], str]) -> str:
        return self._secrets.setdefault(name, make())

    async def take_token(self, bucket: str, limit: int, cost: int = 1) -> tuple[bool, float]:
        return self._buckets.take(bucket, limit, cost)

    async def request_cancel(self, prediction_id: str) -> None:
        self._cancels.add(prediction_id)

    async def cancel_requested(self, prediction_id: str) -> bool:
        return prediction_id in self._cancels

    async def cancels_requested(self, prediction_ids: list[str]) -> set[str]:
        return self._cancels.intersection(prediction_ids)

    async def hold(self, owner: str, prediction_id: str, most: int) -> bool:
        owners = self._unfinished.setdefault(owner, {})
        for gone in [i for i, at in owners.items() if at < time.time() - self._ttl_s]:
            del owners[gone]  # (expired unfinished, as their predictions are)
        if prediction_id not in owners and len(owners) >= most:
            return False
        owners[prediction_id] = time.time()
        return True

    async def unhold(self, owner: str, prediction_id: str) -> None:
        self._unfinished.get(owner, {}).pop(prediction_id, None)

    async def claim(self, prediction_id: str, owner: str, lease_s: float) -> bool:
        held = self._leases.get(prediction_id)
        if held is not None and held[1] > time.monotonic():
            return False
        self._leases[prediction_id] = (owner, time.monotonic() + lease_s)
        return True

    async def renew(self, prediction_ids: list[str], owner: str, lease_s: float) -> None:
        for prediction_id in prediction_ids:
            self._leases[prediction_id] = (owner, time.monotonic() + lease_s)

    async def release(self, prediction_id: str) -> None:
        self._leases.pop(prediction_id, None)

    async def orphans(self) -> list[str]:
        now = time.monotonic()
        return [pid for pid in self._running
                if pid not in self._leases or self._leases[pid][1] <= now]

    async def ping(self) -> None:
        """This replica's memory always answers."""

    def _expire(self) -> None:
        cutoff = time.time() - self._ttl_s
        for pid, state in list(self._predictions.items()):
            if state["created"] < cutoff or len(self._predictions) > self._max:
                del self._predictions[pid]
                self._cancels.discard(pid)
                self._running.discard(pid)
                self._leases.pop(pid, None)
                self._unfinished.get(owner_of(state["private"]), {}).pop(pid, None)


def _page_of(ids: list[str], after: str | None, limit: int) -> tuple[list[str], bool]:
    """The `limit` ids after `after` (from the first when None; none when it is not
    listed), and whether more follow."""
    start = ids.index(after) + 1 if after in ids else (0 if after is None else len(ids))
    return ids[start:start + limit], start + limit < len(ids)
