"""The bounds on unfinished predictions (serve.predictions.PredictionRunner.room): per
ingress replica (`max_unfinished_predictions`, 503), counting the creates it is still
making, and per key (`api_keys[].max_unfinished_predictions`, 429), counted in the store
for every replica at once, from the moment a create is let in until its prediction ends,
however it ends. Two runners on one store stand for two ingress replicas."""

import asyncio

import pytest

from serve.predictions import Prediction, PredictionRunner, PredictionsFull
from serve.rate_limits import RateLimited
from tests.unit.conftest import Work


async def _make(runner: PredictionRunner, owner: str, key_max: int | None, most: int = 10,
                before_start=None) -> Prediction:
    """Create a prediction of the key named `owner` as the Replicate route does."""
    async with runner.room(owner, key_max, most) as pid:
        if before_start is not None:
            await before_start()  # (fetching and decoding its input images)
        prediction = Prediction(id=pid, model="m/x", version="v", input={},
                                private={"client": owner})
        await runner.start(prediction)
    return prediction


async def _refused(make) -> RateLimited | PredictionsFull:
    with pytest.raises((RateLimited, PredictionsFull)) as refused:
        await make
    return refused.value


def test_a_keys_unfinished_predictions_count_on_every_replica_until_they_end(store):
    async def scenario():
        a_work, b_work = Work(store, "a"), Work(store, "b")
        a = PredictionRunner(store, "a", a_work)
        b = PredictionRunner(store, "b", b_work, refused=refusals.append)
        made = [await _make(a, "team-a", 2), await _make(a, "team-a", 2)]
        on_b = await _refused(_make(b, "team-a", 2))  # the two on replica a count on b
        other = await _make(b, "team-b", 2)  # another key has its own room
        unbounded = [await _make(b, "team-a", None) for _ in range(2)]  # no limit of its own
        await a.cancel(made[0])
        after_cancel = await _make(b, "team-a", 4)
        again = await _refused(_make(b, "team-a", 4))
        a_work.release.set()  # team-a's other one on replica a succeeds
        await asyncio.sleep(0.05)
        after_success = await _make(b, "team-a", 4)
        b_work.release.set()
        await asyncio.sleep(0.05)
        return on_b, other, unbounded, after_cancel, again, after_success

    refusals = []
    on_b, other, unbounded, after_cancel, again, after_success = asyncio.run(scenario())
    assert refusals == ["team-a", "team-a"]  # (each counted in rate_limited_total{key})
    assert isinstance(on_b, RateLimited) and on_b.status == 429 and on_b.retry_after_s == 5
    assert "team-a has 2 unfinished predictions" in on_b.message
    assert other.owner == "team-b" and all(p.owner == "team-a" for p in unbounded)
    # Those made without the key's limit count towards it as well: of 2 + 2, 3 are left
    # after the cancel, so a fourth is let in at 4 and a fifth is not; one ending makes
    # room again.
    assert after_cancel.owner == "team-a" and isinstance(again, RateLimited)
    assert after_success.owner == "team-a"


def test_creates_sent_at_once_are_counted_while_they_are_made(store):
    async def scenario():
        runner = PredictionRunner(store, "a", Work(store, "a"), refused=refusals.append)
        fetching = asyncio.Event()

        async def fetch():
            await fetching.wait()

        first = asyncio.ensure_future(_make(runner, "team-a", 1, before_start=fetch))
        await asyncio.sleep(0.05)  # its input images are still being fetched
        burst = [await _refused(_make(runner, "team-a", 1)),
                 await _refused(_make(runner, "team-b", None, most=1))]
        fetching.set()
        made = await first
        return burst, made

    refusals = []
    (by_key, by_replica), made = asyncio.run(scenario())
    assert refusals == ["team-a"]  # a full replica is no key's doing
    assert isinstance(by_key, RateLimited) and "team-a has 1 unfinished" in by_key.message
    assert isinstance(by_replica, PredictionsFull) and by_replica.status == 503
    assert by_replica.retry_after_s == 5 and "runs 1 unfinished predictions" in by_replica.message
    assert made.owner == "team-a" and made.status == "starting"


def test_creates_sent_at_once_while_the_store_counts_the_keys_stay_within_the_replica(
        store):
    """The key's count is asked of the store (a round trip to Redis): creates arriving
    meanwhile already see the first's place taken on the replica."""
    async def scenario():
        runner = PredictionRunner(store, "a", Work(store, "a"))
        held = store.hold

        async def slow_hold(*args):
            await asyncio.sleep(0.05)
            return await held(*args)

        store.hold = slow_hold
        return await asyncio.gather(*(_make(runner, "team-a", 5, most=1) for _ in range(3)),
                                    return_exceptions=True)

    made, *refused = asyncio.run(scenario())
    assert made.owner == "team-a"
    assert [type(r) for r in refused] == [PredictionsFull, PredictionsFull]


def test_a_create_refused_for_its_input_gives_its_place_back(store):
    async def scenario():
        runner = PredictionRunner(store, "a", Work(store, "a"))

        async def bad_input():
            raise ValueError("an input image that does not decode")

        with pytest.raises(ValueError):
            await _make(runner, "team-a", 1, before_start=bad_input)
        made = await _make(runner, "team-a", 1)  # the refused one no longer counts
        full = await _refused(_make(runner, "team-a", 1))
        return made, full

    made, full = asyncio.run(scenario())
    assert made.owner == "team-a" and isinstance(full, RateLimited)


def test_the_replica_reports_its_unfinished_predictions_as_it_keeps_them(store):
    """What `ray_atelier_unfinished_predictions` is set to, every keep() round."""
    async def scenario():
        work = Work(store, "a")
        runner = PredictionRunner(store, "a", work, lease_s=0.15)  # (a round each 50 ms)
        reported = []
        keeping = asyncio.ensure_future(runner.keep(reported.append))
        await asyncio.sleep(0.12)
        at_start = list(reported)
        for _ in range(2):
            await _make(runner, "team-a", None)
        async with runner.room("team-b", None, 10):  # a create still being made
            await asyncio.sleep(0.12)
            busy = reported[-1]
        work.release.set()
        await asyncio.sleep(0.12)
        keeping.cancel()
        return at_start, busy, reported[-1]

    at_start, busy, ended = asyncio.run(scenario())
    assert at_start and set(at_start) == {0}
    assert busy == 3 and ended == 0
