"""Per-key token buckets: their arithmetic, in memory and in a real Redis."""

import asyncio

import pytest

from serve.auth import ApiKeyConfig, configured_keys, matching_key
from serve.rate_limits import Draw, MemoryBuckets, bucket_id, counted
from serve.redis_state import RedisStore


@pytest.mark.parametrize("method, path, takes", [
    ("POST", "/generate", True), ("POST", "/v1/images/generations", True),
    ("POST", "/v1/images/edits", True), ("POST", "/v1/images/variations", True),
    ("POST", "/v1/predictions", True), ("POST", "/v1/models/acme/sdxl/predictions", True),
    ("POST", "/v1/deployments/acme/prod/predictions", True),
    ("GET", "/v1/predictions", False), ("GET", "/v1/predictions/abc", False),
    ("POST", "/v1/predictions/abc/cancel", False), ("POST", "/v1/files", False),
    ("GET", "/v1/models", False), ("GET", "/files/x.png", False),
])
def test_only_generation_requests_take_a_token(method, path, takes):
    assert counted(method, path) is takes


def test_a_bucket_holds_its_limit_and_refills_evenly():
    buckets = MemoryBuckets()
    draws = [buckets.take("a", 3, now=100.0) for _ in range(4)]
    assert [allowed for allowed, _ in draws] == [True, True, True, False]
    assert [tokens for _, tokens in draws] == [2, 1, 0, 0]
    assert buckets.take("a", 3, now=110.0) == (False, 0.5)  # 10 s: half a token
    assert buckets.take("a", 3, now=120.0) == (True, 0.0)  # 20 s: one
    assert buckets.take("b", 3, now=120.0) == (True, 2.0)  # another key, its own bucket
    assert buckets.take("a", 3, now=1000.0) == (True, 2.0)  # never more than full


def test_answers_say_the_limit_what_is_left_and_when_to_retry():
    assert Draw(True, 1.5, 3).headers() == {"x-ratelimit-limit-requests": "3",
                                            "x-ratelimit-remaining-requests": "1",
                                            "x-ratelimit-reset-requests": "30s"}
    refused = Draw(False, 0.25, 3).refusal("team-a")
    assert refused.status == 429 and refused.retry_after_s == 15
    assert "team-a is over its 3 requests per minute" in refused.message


def test_keys_have_names_for_logs_and_never_show_the_secret():
    keys = configured_keys(["plain-key", ApiKeyConfig(key="sk-team-a-123", name="team-a",
                                                      requests_per_minute=30)])
    assert [k.name for k in keys][1] == "team-a" and keys[0].name.startswith("key-")
    assert "plain-key" not in repr(keys) and "sk-team" not in repr(keys)
    assert matching_key("Bearer sk-team-a-123", keys) is keys[1]
    assert matching_key("Token plain-key", keys) is keys[0]
    assert matching_key("Bearer nope", keys) is None and matching_key(None, keys) is None
    assert "sk-team" not in bucket_id(keys[1]) and len(bucket_id(keys[1])) == 24


def test_redis_buckets_follow_the_same_arithmetic(redis_url):
    async def scenario():
        store = RedisStore(redis_url, ttl_s=60)
        draws = [await store.take_token("test-bucket", 2) for _ in range(3)]
        other = await store.take_token("test-bucket-2", 2)
        await store._redis.delete("atelier:rate:test-bucket", "atelier:rate:test-bucket-2")
        return draws, other

    draws, other = asyncio.run(scenario())
    assert [allowed for allowed, _ in draws] == [True, True, False]
    assert draws[0][1] == pytest.approx(1, abs=0.01) and draws[2][1] < 0.05
    assert other[0] is True


def test_a_draw_may_cost_several_tokens_and_a_refusal_takes_none():
    buckets = MemoryBuckets()
    assert buckets.take("i", 6, cost=4, now=0.0) == (True, 2.0)
    assert buckets.take("i", 6, cost=3, now=0.0) == (False, 2.0)  # short: nothing taken
    assert buckets.take("i", 6, cost=2, now=0.0) == (True, 0.0)
    refused = Draw(False, 0.5, 6, cost=3, unit="images").refusal("team-b")
    assert refused.retry_after_s == 25  # 2.5 images at one per 10 s
    assert "team-b is over its 6 images per minute (this request asks for 3)" in refused.message


def test_image_buckets_are_apart_from_request_buckets():
    (key,) = configured_keys([ApiKeyConfig(key="sk-b", name="team-b", images_per_minute=8)])
    assert key.images_per_minute == 8 and key.requests_per_minute is None
    assert bucket_id(key, "images") == f"{bucket_id(key)}:images"


def test_draw_takes_from_the_units_own_bucket_at_the_keys_rate():
    import asyncio

    from serve.rate_limits import draw
    from serve.state import MemoryStore

    (key,) = configured_keys([ApiKeyConfig(key="sk-c", name="team-c", requests_per_minute=2,
                                           images_per_minute=8)])

    async def draws():
        store = MemoryStore(ttl_s=60, max_file_bytes=1024)
        return [await draw(store, key, "images", 3), await draw(store, key, "images", 6),
                await draw(store, key), await draw(store, key), await draw(store, key)]

    images_ok, images_short, *requests = asyncio.run(draws())
    assert (images_ok.allowed, images_ok.limit, images_ok.cost, images_ok.unit) == (
        True, 8, 3, "images")
    assert images_short.allowed is False and images_short.tokens == pytest.approx(5, abs=0.01)
    # The request bucket is whole after the image draws: two allowed, the third refused.
    assert [d.allowed for d in requests] == [True, True, False]
    assert requests[0].limit == 2 and requests[0].unit == "requests"


def test_an_image_rate_below_one_requests_images_is_refused_at_start_up():
    from serve.config import AtelierConfig

    models = [{"id": "a/b", "embedded": "tiny-sdxl", "limits": {"max_outputs": 4}}]
    with pytest.raises(ValueError, match="images_per_minute 3 is below the 4 images"):
        AtelierConfig.model_validate({"models": models, "api_keys": [
            {"key": "k", "name": "team-b", "images_per_minute": 3}]})
    AtelierConfig.model_validate({"models": models, "api_keys": [
        {"key": "k", "images_per_minute": 4}]})


def test_redis_draws_take_their_cost(redis_url):
    async def scenario():
        store = RedisStore(redis_url, ttl_s=60)
        draws = [await store.take_token("test-cost", 6, cost) for cost in (4, 3, 2)]
        await store._redis.delete("atelier:rate:test-cost")
        return draws

    draws = asyncio.run(scenario())
    assert [allowed for allowed, _ in draws] == [True, False, True]
    assert draws[1][1] == pytest.approx(2, abs=0.01) and draws[2][1] < 0.05
