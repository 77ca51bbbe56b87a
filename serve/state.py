"""The two `StateStore` backends: this replica's memory, or Redis for a cluster.

Both are bounded: predictions and files expire `ttl_s` after they were made; the memory
backend also caps the bytes of files it keeps.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict

from serve.files import FileStore, StoredFile, file_name
from serve.predictions import Prediction

_PREFIX = "atelier:"


class MemoryStore:
    def __init__(self, ttl_s: float, max_file_bytes: int, max_predictions: int = 10_000):
        self._ttl_s, self._max = ttl_s, max_predictions
        self._predictions: OrderedDict[str, dict] = OrderedDict()
        self._cancels: set[str] = set()
        self._files = FileStore(ttl_s, max_file_bytes)

    async def save(self, prediction: Prediction) -> None:
        self._predictions[prediction.id] = prediction.to_state()
        self._expire()

    async def load(self, prediction_id: str) -> Prediction | None:
        state = self._predictions.get(prediction_id)
        return Prediction(**state) if state else None

    async def page(self, after: str | None, limit: int) -> tuple[list[Prediction], str | None]:
        ids = list(reversed(self._predictions))
        start = ids.index(after) + 1 if after in ids else (0 if after is None else len(ids))
        page = [Prediction(**self._predictions[i]) for i in ids[start:start + limit]]
        return page, (page[-1].id if start + limit < len(ids) and page else None)

    async def put_file(self, data: bytes, media_type: str) -> str:
        return self._files.put(data, media_type)

    async def get_file(self, name: str) -> StoredFile | None:
        return self._files.get(name)

    async def request_cancel(self, prediction_id: str) -> None:
        self._cancels.add(prediction_id)

    async def cancel_requested(self, prediction_id: str) -> bool:
        return prediction_id in self._cancels

    def _expire(self) -> None:
        cutoff = time.time() - self._ttl_s
        for pid, state in list(self._predictions.items()):
            if state["created"] < cutoff or len(self._predictions) > self._max:
                del self._predictions[pid]
                self._cancels.discard(pid)


class RedisStore:
    """Keys: atelier:pred:<id> (JSON), atelier:preds (ids by creation time),
    atelier:file:<name> (hash of data and type), atelier:cancel:<id>; all with TTLs."""

    def __init__(self, url: str, ttl_s: float):
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(url)
        self._ttl = max(1, int(ttl_s))

    async def save(self, prediction: Prediction) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{_PREFIX}pred:{prediction.id}", json.dumps(prediction.to_state()),
                     ex=self._ttl)
            pipe.zadd(f"{_PREFIX}preds", {prediction.id: prediction.created})
            pipe.zremrangebyscore(f"{_PREFIX}preds", "-inf", time.time() - self._ttl)
            await pipe.execute()

    async def load(self, prediction_id: str) -> Prediction | None:
        raw = await self._redis.get(f"{_PREFIX}pred:{prediction_id}")
        return Prediction(**json.loads(raw)) if raw else None

    async def page(self, after: str | None, limit: int) -> tuple[list[Prediction], str | None]:
        start = 0
        if after is not None:
            rank = await self._redis.zrevrank(f"{_PREFIX}preds", after)
            start = rank + 1 if rank is not None else -1
        if start < 0:
            return [], None
        ids = await self._redis.zrevrange(f"{_PREFIX}preds", start, start + limit)
        page = [p for p in [await self.load(i.decode()) for i in ids[:limit]] if p]
        return page, (page[-1].id if len(ids) > limit and page else None)

    async def put_file(self, data: bytes, media_type: str) -> str:
        name = file_name(media_type)
        key = f"{_PREFIX}file:{name}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"data": data, "type": media_type})
            pipe.expire(key, self._ttl)
            await pipe.execute()
        return name

    async def get_file(self, name: str) -> StoredFile | None:
        found = await self._redis.hgetall(f"{_PREFIX}file:{name}")
        if not found:
            return None
        return StoredFile(found[b"data"], found[b"type"].decode())

    async def request_cancel(self, prediction_id: str) -> None:
        await self._redis.set(f"{_PREFIX}cancel:{prediction_id}", b"1", ex=self._ttl)

    async def cancel_requested(self, prediction_id: str) -> bool:
        return bool(await self._redis.exists(f"{_PREFIX}cancel:{prediction_id}"))
