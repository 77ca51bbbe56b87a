"""The `StateStore` backend in Redis: every ingress replica of a cluster sees the same
predictions, files, uploads, leases and rate buckets, and they outlive restarts (each
with a TTL)."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError, WatchError

from serve.errors import StoreUnavailable
from serve.files import StoredFile, file_name
from serve.predictions import TERMINAL, Prediction
from serve.rate_limits import REDIS_TAKE
from serve.uploads import Upload

_PREFIX = "atelier:"
log = logging.getLogger("ray.serve.atelier.state")


def _answering(cls: type) -> type:
    """Each public coroutine method of `cls` raises StoreUnavailable where Redis does not
    answer (refused or lost connection, time-out, a failing server), so that a request
    gets 503 with Retry-After in its API's shape, not an internal error."""
    def translated(method: Callable) -> Callable:
        @functools.wraps(method)
        async def call(self, *args, **kwargs):
            try:
                return await method(self, *args, **kwargs)
            except RedisError as exc:
                log.warning("Redis did not answer (%s): %s", method.__name__, exc)
                raise StoreUnavailable("the prediction and file store (Redis) does not "
                                       "answer; retry later") from exc
        return call

    for name, method in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(method):
            setattr(cls, name, translated(method))
    return cls


REDIS_TIMEOUT_S = 5.0
REDIS_CONNECTIONS = 100  # an ingress replica's connections to Redis
# Count a prediction among a key's unfinished (KEYS[1]) if they are fewer than ARGV[2]:
# ARGV[1] its id, ARGV[3] the time, ARGV[4] the TTL (older entries are no longer counted).
REDIS_HOLD = """
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('EXPIRE', KEYS[1], ttl)
return 1
"""


def _owned(owner: str, kind: str = "preds") -> str:
    """The index of one API key name's predictions (or `uploads`, `unfinished`)."""
    return f"{_PREFIX}{kind}:by:{owner}"


@_answering
class RedisStore:
    """Keys: atelier:pred:<id> (JSON), atelier:preds (ids by creation time) and
    atelier:preds:by:<key name> (one key's),
    atelier:file:<name> (hash of data and type), atelier:upload:<id> (hash of data and the
    upload's record), atelier:uploads (upload ids by creation time) and
    atelier:uploads:by:<key name> (one key's), atelier:cancel:<id>,
    atelier:lease:<id> (the owning replica); all with TTLs. atelier:running is the set of
    unfinished ids and atelier:unfinished:by:<key name> one key's (by when last saved);
    atelier:secret:<name> (the webhook signing secret) has no TTL;
    atelier:rate:<bucket> is an API key's token bucket (`serve.rate_limits`)."""

    def __init__(self, url: str, ttl_s: float):
        import redis.asyncio as redis

        # A Redis that stops answering (paused, or its host gone without a reset) is
        # unavailable after this long, not waited for without end; `?socket_timeout=`
        # and `?socket_connect_timeout=` in the URL set others. Past REDIS_CONNECTIONS
        # calls at once, a call waits for a connection (as long), where redis-py's
        # default pool fails it at once ("Too many connections"); `?max_connections=`
        # sets another number.
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_CONNECTIONS, timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        self._redis = redis.Redis(connection_pool=pool)
        self._ttl = max(1, int(ttl_s))
        self._take = self._redis.register_script(REDIS_TAKE)
        self._hold = self._redis.register_script(REDIS_HOLD)

    async def save(self, prediction: Prediction) -> None:
        key = f"{_PREFIX}pred:{prediction.id}"
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if not prediction.done:  # (in one step with reading what is stored)
                        await pipe.watch(key)
                        stored = await pipe.get(key)
                        if stored and json.loads(stored)["status"] in TERMINAL:
                            return  # finished by another (a cancel): that stays
                        pipe.multi()
                    self._queue_save(pipe, key, prediction)
                    await pipe.execute()
                    return
                except WatchError:  # it was saved meanwhile: read it again
                    continue

    def _queue_save(self, pipe, key: str, prediction: Prediction) -> None:
        pipe.set(key, json.dumps(prediction.to_state()), ex=self._ttl)
        for index in (f"{_PREFIX}preds", _owned(prediction.owner)):
            pipe.zadd(index, {prediction.id: prediction.created})
            pipe.zremrangebyscore(index, "-inf", time.time() - self._ttl)
            pipe.expire(index, self._ttl)
        unfinished = _owned(prediction.owner, "unfinished")
        if prediction.done:
            pipe.srem(f"{_PREFIX}running", prediction.id)
            pipe.delete(f"{_PREFIX}lease:{prediction.id}")
            pipe.zrem(unfinished, prediction.id)
        else:
            pipe.sadd(f"{_PREFIX}running", prediction.id)
            pipe.zadd(unfinished, {prediction.id: time.time()})
            pipe.expire(unfinished, self._ttl)

    async def load(self, prediction_id: str) -> Prediction | None:
        raw = await self._redis.get(f"{_PREFIX}pred:{prediction_id}")
        return Prediction(**json.loads(raw)) if raw else None

    async def page(self, after: str | None, limit: int, owner: str | None = None,
                   ) -> tuple[list[Prediction], str | None]:
        index = f"{_PREFIX}preds" if owner is None else _owned(owner)
        ids, more = await self._page_ids(index, after, limit)
        page = [p for p in [await self.load(i) for i in ids] if p]
        return page, (page[-1].id if more and page else None)

    async def _page_ids(self, index: str, after: str | None, limit: int,
                        ) -> tuple[list[str], bool]:
        """The `limit` ids of the sorted set `index`, newest first, after `after` (from
        the newest when None; none when it is not listed), and whether more follow."""
        start = 0
        if after is not None:
            rank = await self._redis.zrevrank(index, after)
            start = rank + 1 if rank is not None else -1
        if start < 0:
            return [], False
        ids = await self._redis.zrevrange(index, start, start + limit)
        return [i.decode() for i in ids[:limit]], len(ids) > limit

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

    async def put_upload(self, upload: Upload, data: bytes) -> None:
        key = f"{_PREFIX}upload:{upload.id}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"data": data, "info": json.dumps(upload.to_state())})
            pipe.expire(key, self._ttl)
            for index in (f"{_PREFIX}uploads", _owned(upload.owner, "uploads")):
                pipe.zadd(index, {upload.id: upload.created})
                pipe.zremrangebyscore(index, "-inf", time.time() - self._ttl)
                pipe.expire(index, self._ttl)
            await pipe.execute()

    async def get_upload(self, upload_id: str) -> Upload | None:
        info = await self._redis.hget(f"{_PREFIX}upload:{upload_id}", "info")
        return Upload(**json.loads(info)) if info else None

    async def upload_data(self, upload_id: str) -> bytes | None:
        return await self._redis.hget(f"{_PREFIX}upload:{upload_id}", "data")

    async def upload_page(self, after: str | None, limit: int, owner: str | None = None,
                          ) -> tuple[list[Upload], str | None]:
        index = f"{_PREFIX}uploads" if owner is None else _owned(owner, "uploads")
        ids, more = await self._page_ids(index, after, limit)
        page = [u for u in [await self.get_upload(i) for i in ids] if u]
        return page, (page[-1].id if more and page else None)

    async def delete_upload(self, upload: Upload) -> bool:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(f"{_PREFIX}uploads", upload.id)
            pipe.zrem(_owned(upload.owner, "uploads"), upload.id)
            pipe.delete(f"{_PREFIX}upload:{upload.id}")
            return bool((await pipe.execute())[-1])

    async def take_token(self, bucket: str, limit: int, cost: int = 1) -> tuple[bool, float]:
        allowed, tokens = await self._take(keys=[f"{_PREFIX}rate:{bucket}"],
                                           args=[limit, cost])
        return bool(int(allowed)), float(tokens)

    async def shared_secret(self, name: str, make: Callable[[], str]) -> str:
        """Made by the first replica to ask, kept without expiry."""
        await self._redis.set(f"{_PREFIX}secret:{name}", make(), nx=True)
        return (await self._redis.get(f"{_PREFIX}secret:{name}")).decode()

    async def request_cancel(self, prediction_id: str) -> None:
        await self._redis.set(f"{_PREFIX}cancel:{prediction_id}", b"1", ex=self._ttl)

    async def cancel_requested(self, prediction_id: str) -> bool:
        return bool(await self._redis.exists(f"{_PREFIX}cancel:{prediction_id}"))

    async def cancels_requested(self, prediction_ids: list[str]) -> set[str]:
        if not prediction_ids:
            return set()
        found = await self._redis.mget([f"{_PREFIX}cancel:{i}" for i in prediction_ids])
        return {i for i, mark in zip(prediction_ids, found, strict=True) if mark is not None}

    async def hold(self, owner: str, prediction_id: str, most: int) -> bool:
        return bool(await self._hold(keys=[_owned(owner, "unfinished")],
                                     args=[prediction_id, most, time.time(), self._ttl]))

    async def unhold(self, owner: str, prediction_id: str) -> None:
        await self._redis.zrem(_owned(owner, "unfinished"), prediction_id)

    async def ping(self) -> None:
        await self._redis.ping()

    async def claim(self, prediction_id: str, owner: str, lease_s: float) -> bool:
        return bool(await self._redis.set(f"{_PREFIX}lease:{prediction_id}", owner, nx=True,
                                          px=int(lease_s * 1000)))

    async def renew(self, prediction_ids: list[str], owner: str, lease_s: float) -> None:
        if not prediction_ids:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for prediction_id in prediction_ids:
                pipe.set(f"{_PREFIX}lease:{prediction_id}", owner, px=int(lease_s * 1000))
            await pipe.execute()

    async def release(self, prediction_id: str) -> None:
        await self._redis.delete(f"{_PREFIX}lease:{prediction_id}")

    async def orphans(self) -> list[str]:
        """Also forgets running ids whose prediction has expired."""
        ids = [i.decode() for i in await self._redis.smembers(f"{_PREFIX}running")]
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for prediction_id in ids:
                pipe.exists(f"{_PREFIX}lease:{prediction_id}")
                pipe.exists(f"{_PREFIX}pred:{prediction_id}")
            found = await pipe.execute()
        leased, stored = found[0::2], found[1::2]
        gone = [i for i, kept in zip(ids, stored, strict=True) if not kept]
        if gone:
            await self._redis.srem(f"{_PREFIX}running", *gone)
        return [i for i, held, kept in zip(ids, leased, stored, strict=True)
                if kept and not held]
