import asyncio
import hashlib
import time

from serve.predictions import Prediction, PredictionRunner
from serve.redis_state import RedisStore
from serve.state import MemoryStore
from serve.uploads import Upload, upload_id
from tests.unit.conftest import Work, flush_redis


def _run(coro):
    return asyncio.run(coro)


def test_pages_are_newest_first_with_a_cursor():
    store = MemoryStore(ttl_s=60, max_file_bytes=1000)
    preds = [Prediction(model="a/b", version="v", input={"i": i}) for i in range(5)]
    for p in preds:
        _run(store.save(p))
    first, cursor = _run(store.page(None, 2))
    second, cursor2 = _run(store.page(cursor, 2))
    third, cursor3 = _run(store.page(cursor2, 2))
    ids = [p.id for p in first + second + third]
    assert ids == [p.id for p in reversed(preds)] and cursor3 is None


def test_saved_state_round_trips_and_cancels_are_recorded():
    store = MemoryStore(ttl_s=60, max_file_bytes=1000)
    p = Prediction(model="a/b", version="v", input={"prompt": "x"})
    p.finish("succeeded", output=["u"])
    _run(store.save(p))
    loaded = _run(store.load(p.id))
    assert loaded.to_state() == p.to_state() and loaded is not p
    assert not _run(store.cancel_requested(p.id))
    _run(store.request_cancel(p.id))
    assert _run(store.cancel_requested(p.id))


def test_old_predictions_expire():
    store = MemoryStore(ttl_s=60, max_file_bytes=1000)
    old = Prediction(model="a/b", version="v", input={}, created=0.0)
    _run(store.save(old))
    _run(store.save(Prediction(model="a/b", version="v", input={})))
    assert _run(store.load(old.id)) is None


def test_files_expire_and_the_oldest_go_when_over_budget():
    store = MemoryStore(ttl_s=60, max_file_bytes=10)
    a = _run(store.put_file(b"123456", "image/png"))
    b = _run(store.put_file(b"abcdef", "image/png"))
    assert a.endswith(".png") and _run(store.get_file(a)) is None
    assert _run(store.get_file(b)).data == b"abcdef"


# Leases: two runners on one store stand for two ingress replicas.

def test_a_stopped_replicas_prediction_is_adopted_once_its_lease_lapses(store):
    async def scenario():
        a_work, b_work = Work(store, "a"), Work(store, "b")
        a = PredictionRunner(store, "a", a_work, lease_s=0.3)
        b = PredictionRunner(store, "b", b_work, lease_s=0.3)
        p = Prediction(model="m/x", version="v", input={}, logs="Using seed: 1\n")
        await a.start(p)
        await asyncio.sleep(0.05)
        held = await b.adopt_orphans()  # a holds the lease
        await asyncio.sleep(0.4)  # a stopped renewing: as if its process had died
        adopted = await b.adopt_orphans()
        again = await a.adopt_orphans()  # b holds it now
        b_work.release.set()
        await asyncio.sleep(0.05)
        return p.id, held, adopted, again, b_work.ran, await store.load(p.id), \
            await store.orphans()

    pid, held, adopted, again, ran, final, left = _run(scenario())
    assert held == [] and adopted == [pid] and again == [] and ran == [pid]
    assert final.status == "succeeded" and final.output == ["b"]
    assert "stopped; running it again on b" in final.logs
    assert left == []  # finished: no longer running


def test_a_replica_that_hands_over_lets_another_adopt_at_once(store):
    async def scenario():
        a_work, b_work = Work(store, "a"), Work(store, "b")
        a = PredictionRunner(store, "a", a_work, lease_s=60)
        b = PredictionRunner(store, "b", b_work, lease_s=60)
        p = Prediction(model="m/x", version="v", input={})
        await a.start(p)
        await asyncio.sleep(0.05)
        before = await b.adopt_orphans()
        await a.hand_over()
        adopted = await b.adopt_orphans()
        b_work.release.set()
        await asyncio.sleep(0.05)
        return p.id, before, adopted, a_work.ran, (await store.load(p.id)).status

    pid, before, adopted, ran_on_a, status = _run(scenario())
    assert before == [] and adopted == [pid] and ran_on_a == [pid] and status == "succeeded"


def test_renewed_leases_keep_predictions_with_their_replica(store):
    async def scenario():
        work = Work(store, "a")
        a = PredictionRunner(store, "a", work, lease_s=0.3)
        b = PredictionRunner(store, "b", Work(store, "b"), lease_s=0.3)
        await a.start(Prediction(model="m/x", version="v", input={}))
        keeper = asyncio.create_task(a.keep())
        await asyncio.sleep(0.8)  # well past one lease
        adopted = await b.adopt_orphans()
        keeper.cancel()
        work.release.set()
        await asyncio.sleep(0.05)
        return adopted

    assert _run(scenario()) == []


def test_uploads_are_kept_listed_newest_first_and_deleted(store):
    async def scenario():
        first = Upload.of(b"\x89PNG first", "a.png", "image/png", {"n": 1})
        second = Upload.of(b"second", "b.bin", "application/octet-stream", {})
        second = Upload(**{**second.to_state(), "created": first.created + 1})
        await store.put_upload(first, b"\x89PNG first")
        await store.put_upload(second, b"second")
        listed = [u.id for u in (await store.upload_page(None, 10))[0]]
        got, data = await store.get_upload(first.id), await store.upload_data(first.id)
        deleted, again = await store.delete_upload(first), await store.delete_upload(first)
        return (first, second, listed, got, data, deleted, again,
                await store.get_upload(first.id), await store.upload_data(first.id),
                [u.id for u in (await store.upload_page(None, 10, "open"))[0]])

    first, second, listed, got, data, deleted, again, gone, no_data, left = _run(scenario())
    assert listed == [second.id, first.id]
    assert got == first and got.metadata == {"n": 1} and data == b"\x89PNG first"
    assert first.checksums == {"sha256": hashlib.sha256(b"\x89PNG first").hexdigest(),
                               "md5": hashlib.md5(b"\x89PNG first").hexdigest()}
    assert deleted and not again and gone is None and no_data is None and left == [second.id]


def test_uploads_expire_with_their_data():
    store = MemoryStore(ttl_s=60, max_file_bytes=10)
    a, b = Upload.of(b"123456", "a", "x/y", {}), Upload.of(b"abcdef", "b", "x/y", {})
    _run(store.put_upload(a, b"123456"))
    _run(store.put_upload(b, b"abcdef"))  # over the 10-byte budget: the oldest goes
    assert list(store._uploads) == [b.id]  # its record with it
    assert _run(store.get_upload(a.id)) is None and _run(store.upload_data(a.id)) is None
    assert [u.id for u in _run(store.upload_page(None, 10))[0]] == [b.id]
    assert list(store._uploads) == [b.id]  # no record is kept of what is gone


def test_upload_ids_are_read_from_files_api_urls_only():
    uid = "0123456789abcdef0123456789abcdef"
    assert upload_id(f"http://10.0.0.5:8000/v1/files/{uid}") == uid
    assert upload_id(f"https://gw.example/shared/v1/files/{uid}/download?x=1") == uid
    assert upload_id(f"https://cdn.example/files/{uid}") is None
    assert upload_id(f"https://cdn.example/v1/files/{uid}/other") is None
    assert upload_id("http://[::1/v1/files/x") is None


def test_a_key_pages_through_its_own_predictions_from_its_own_index(store):
    now = time.time()
    made = [Prediction(model="a/b", version="v", input={}, created=now + i / 1000,
                       private={"client": owner})
            for i, owner in enumerate(["team-a", "team-b", "team-a", "team-b", "team-a"])]

    async def scenario():
        for p in made:
            await store.save(p)
        first, cursor = await store.page(None, 2, "team-a")
        rest, end = await store.page(cursor, 2, "team-a")
        return (first, rest, end, await store.page(None, 10, "team-b"),
                await store.page(None, 10), await store.page(None, 10, "team-c"))

    first, rest, end, (theirs, _), (everyone, _), nobody = _run(scenario())
    newest_first = list(reversed(made))
    assert [p.id for p in first + rest] == [p.id for p in newest_first if p.owner == "team-a"]
    assert len(first) == 2 and end is None
    assert [p.id for p in theirs] == [p.id for p in newest_first if p.owner == "team-b"]
    assert [p.id for p in everyone] == [p.id for p in newest_first]
    assert nobody == ([], None)


def test_a_key_pages_through_its_own_uploads_from_its_own_index(store):
    now = time.time()
    made = [Upload(**{**Upload.of(b"x", f"{i}.png", "image/png", {}, owner).to_state(),
                      "created": now + i / 1000})
            for i, owner in enumerate(["team-a", "team-b", "team-a", "team-b", "team-a"])]

    async def scenario():
        for u in made:
            await store.put_upload(u, b"x")
        first, cursor = await store.upload_page(None, 2, "team-a")
        rest, end = await store.upload_page(cursor, 2, "team-a")
        await store.delete_upload(made[3])
        return (first, rest, end, await store.upload_page(None, 1, "team-b"),
                await store.upload_page(None, 3), await store.upload_page(None, 10, "team-c"))

    first, rest, end, (theirs, _), (everyone, more), nobody = _run(scenario())
    assert [u.id for u in first + rest] == [made[4].id, made[2].id, made[0].id]
    assert len(first) == 2 and end is None
    # The newer was deleted, from both indices: a page of one shows the older.
    assert [u.id for u in theirs] == [made[1].id]
    assert [u.id for u in everyone] == [made[4].id, made[2].id, made[1].id]
    assert more == made[1].id and nobody == ([], None)


class Counting:
    """The store, counting the calls that read cancel requests."""

    def __init__(self, store):
        self.store, self.calls = store, 0

    def __getattr__(self, name):
        if name.startswith("cancel"):
            self.calls += 1
        return getattr(self.store, name)


def test_cancels_are_read_for_every_watched_prediction_in_one_call(store):
    async def scenario():
        counted = Counting(store)
        runner = PredictionRunner(counted, "a", None)
        ids = [f"p{i}" for i in range(50)]
        watches = [asyncio.ensure_future(runner.until_canceled(i)) for i in [*ids, ids[7]]]
        await asyncio.sleep(0.35)  # three or four polls
        polled = counted.calls
        await store.request_cancel(ids[7])
        await asyncio.sleep(0.25)
        ended = [i for i, w in zip([*ids, ids[7]], watches, strict=True) if w.done()]
        for w in watches:
            w.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        await asyncio.sleep(0.25)  # the watching loop ends with nothing left to watch
        return polled, ended, runner._watched, runner._watcher.done()

    polled, ended, watched, stopped = _run(scenario())
    assert 3 <= polled <= 5  # one call per poll for all 50 (one each: 150 or more)
    assert ended == ["p7", "p7"] and watched == {} and stopped


def test_more_calls_at_once_than_redis_connections_wait_for_one(redis_url):
    """An ingress's polls, renewals and requests may well be more than its 100
    connections to Redis at once: the extra ones wait for one, never fail."""
    _run(flush_redis(redis_url))

    async def scenario():
        store = RedisStore(redis_url, ttl_s=60)
        p = Prediction(model="a/b", version="v", input={})
        await store.save(p)
        loaded = await asyncio.gather(*[store.load(p.id) for _ in range(400)])
        return p, loaded

    p, loaded = _run(scenario())
    assert [x.id for x in loaded] == [p.id] * 400


def test_a_canceled_prediction_stays_canceled_while_its_run_still_saves_progress(store):
    """A cancel through replica b ends the prediction in the store; replica a's run, yet to
    notice, saves its progress after that. The store keeps it canceled: not running again,
    not adopted, no longer counted among its key's unfinished."""
    async def scenario():
        async def progress(p):
            for step in range(1000):
                p.status, p.logs = "processing", f"step {step}\n"
                await store.save(p)
                await asyncio.sleep(0.01)

        a = PredictionRunner(store, "a", progress)
        b = PredictionRunner(store, "b", progress)
        p = Prediction(model="m/x", version="v", input={}, private={"client": "team-a"})
        await a.start(p)
        await asyncio.sleep(0.05)
        await b.cancel(await store.load(p.id))
        await asyncio.sleep(0.1)  # a's run saved its progress some ten times since
        kept, steps = await store.load(p.id), p.logs
        found = [kept.status, await store.orphans(), await b.adopt_orphans(),
                 await store.hold("team-a", "next", 1)]
        await a.cancel(p)
        return found, kept.logs, steps

    found, kept_logs, steps = _run(scenario())
    assert found == ["canceled", [], [], True]
    assert kept_logs != steps  # the run went on saving; none of it landed
