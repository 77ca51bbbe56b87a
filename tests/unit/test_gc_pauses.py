"""Garbage collection in a serving process: the heap start-up leaves is frozen, and each
collection is timed by generation."""

import gc

from serve import gc_pauses


class _Recorder:
    def __init__(self):
        self.seen = []

    def observe(self, value, tags=None):
        self.seen.append((value, tags))


def test_settle_freezes_what_start_up_left_out_of_later_collections():
    held = [[i] for i in range(50_000)]  # 50,001 objects a collection would scan
    try:
        settled = gc_pauses.settle()
        assert settled["frozen"] == gc.get_freeze_count() >= len(held) + 1
        assert not any(o is held for o in gc.get_objects(generation=2))
        made_after = [[0]]
        gc.collect(1)  # into the oldest generation, which full collections scan
        assert any(o is made_after for o in gc.get_objects(generation=2))
    finally:
        gc.unfreeze()
    assert any(o is held for o in gc.get_objects(generation=2))


def test_watch_times_every_collection_by_generation_once_per_process(monkeypatch):
    monkeypatch.setattr(gc_pauses, "_watched", [])
    monkeypatch.setattr(gc_pauses, "_paused", [0.0])
    before = list(gc.callbacks)
    first, second = _Recorder(), _Recorder()
    gc_pauses.watch(first)
    gc_pauses.watch(second)  # the process already has its watcher
    added = [cb for cb in gc.callbacks if cb not in before]
    try:
        assert len(added) == 1
        gc.collect(2)
        gc.collect(0)
    finally:
        gc.callbacks.remove(added[0])
    generations = [tags["generation"] for _, tags in first.seen]
    assert generations[-2:] == ["2", "0"] and second.seen == []
    assert all(0 <= seconds < 10 for seconds, _ in first.seen)
    # The running total is what the histogram saw, to the float.
    assert gc_pauses.paused_s() == sum(seconds for seconds, _ in first.seen) > 0
