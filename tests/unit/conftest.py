"""What several unit test modules share: a state store of each kind, and a prediction run
that ends when told to."""

import asyncio

import pytest

from serve.redis_state import RedisStore
from serve.state import MemoryStore


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryStore(ttl_s=60, max_file_bytes=1000)
    url = request.getfixturevalue("redis_url")
    asyncio.run(flush_redis(url))
    return RedisStore(url, ttl_s=60)


async def flush_redis(url):
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()


class Work:
    """A prediction run that finishes when told to, and records where it ran."""

    def __init__(self, store, name):
        self.store, self.name, self.ran, self.release = store, name, [], asyncio.Event()

    async def __call__(self, p):
        self.ran.append(p.id)
        await self.release.wait()
        p.finish("succeeded", output=[self.name])
        await self.store.save(p)
