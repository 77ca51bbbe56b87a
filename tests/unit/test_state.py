import asyncio

from serve.predictions import Prediction
from serve.state import MemoryStore


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
