"""Per-key rate limits on generation requests: a token bucket per API key.

A key with `requests_per_minute: N` has a bucket of N tokens, refilled at N per minute;
each generation request (POST /generate, /v1/images/*, a prediction's create) takes one,
and finds none: 429 with Retry-After, the time until the next token. Reading predictions
and files, uploads, cancels and listings take none, so a client polling a prediction is
never throttled. Buckets live in the state store: with Redis, every ingress replica
draws from the same bucket.

Answers to counted requests carry OpenAI's headers: `x-ratelimit-limit-requests`,
`x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` (until the bucket is full).

A key with `images_per_minute: M` also has a bucket of M images: a generation request
takes as many as it asks for once its fields are read (`serve.context.charge_images`),
before any work is queued, so a request of four images costs four times one of one.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serve.auth import ApiKey
from serve.errors import AtelierError

if TYPE_CHECKING:
    from serve.predictions import StateStore

_GENERATION = re.compile(r"^/(?:generate|v1/images/(?:generations|edits|variations)"
                         r"|v1/predictions|v1/(?:models|deployments)/[^/]+/[^/]+/predictions)$")


def counted(method: str, path: str) -> bool:
    """Whether a request takes a token: the generation requests of every API."""
    return method == "POST" and bool(_GENERATION.match(path))


class RateLimited(AtelierError):
    status = 429
    kind = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Draw:
    """One request's draw of `cost` tokens from its key's bucket of `unit`s."""

    allowed: bool
    tokens: float  # left after the draw
    limit: int
    cost: int = 1
    unit: str = "requests"

    @property
    def per_s(self) -> float:
        return self.limit / 60

    def headers(self) -> dict[str, str]:
        return {"x-ratelimit-limit-requests": str(self.limit),
                "x-ratelimit-remaining-requests": str(max(0, math.floor(self.tokens))),
                "x-ratelimit-reset-requests": f"{(self.limit - self.tokens) / self.per_s:.0f}s"}

    def refusal(self, name: str) -> RateLimited:
        wait_s = max(1, math.ceil((self.cost - self.tokens) / self.per_s))
        asked = f" (this request asks for {self.cost})" if self.cost > 1 else ""
        return RateLimited(f"API key {name} is over its {self.limit} {self.unit} per minute"
                           f"{asked}; retry in {wait_s} s", wait_s)


def bucket_id(key: ApiKey, unit: str = "requests") -> str:
    """The bucket's name in the store: never the key itself."""
    digest = hashlib.sha256(key.secret).hexdigest()[:24]
    return digest if unit == "requests" else f"{digest}:{unit}"


def refill(tokens: float, since_s: float, limit: int) -> float:
    """A bucket's tokens `since_s` seconds after it held `tokens`."""
    return min(float(limit), tokens + max(0.0, since_s) * limit / 60)


class MemoryBuckets:
    """The buckets of one ingress replica (the memory store's)."""

    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}  # id -> (tokens, at)

    def take(self, bucket: str, limit: int, cost: int = 1,
             now: float | None = None) -> tuple[bool, float]:
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(bucket, (float(limit), now))
        tokens = refill(tokens, now - at, limit)
        allowed = tokens >= cost
        tokens -= cost * allowed
        self._buckets[bucket] = (tokens, now)
        return allowed, tokens


# The same arithmetic in Redis, atomically and on Redis's clock: KEYS[1] the bucket,
# ARGV[1] the limit, ARGV[2] the cost.
REDIS_TAKE = """
local limit = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1]) or limit
local at = tonumber(held[2]) or now
tokens = math.min(limit, tokens + math.max(0, now - at) * limit / 60)
local allowed = 0
if tokens >= cost then tokens = tokens - cost; allowed = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 120)
return {allowed, tostring(tokens)}
"""


async def draw(store: StateStore, key: ApiKey, unit: str = "requests", cost: int = 1) -> Draw:
    """Take `cost` from the key's bucket of `unit` (requests or images), whose limit is the
    key's `<unit>_per_minute` (set)."""
    limit = getattr(key, f"{unit}_per_minute")
    allowed, tokens = await store.take_token(bucket_id(key, unit), limit, cost)
    return Draw(allowed, tokens, limit, cost, unit)
