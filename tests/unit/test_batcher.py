import asyncio

import pytest

from deployments.batcher import Batcher


class Recorder:
    """A runner that records each call and answers each request with its own value."""

    def __init__(self, fail_on=None, delay=0.0):
        self.calls: list[list] = []
        self.fail_on, self.delay = fail_on, delay

    async def __call__(self, requests, withdrawn, on_step, on_preview):
        self.calls.append(list(requests))
        self.withdrawn = withdrawn
        on_step(1, 2)
        for index, request in enumerate(requests):
            on_preview(index, f"partial-{request}")
        await asyncio.sleep(self.delay)
        if self.fail_on in requests:
            raise RuntimeError(f"cannot do {self.fail_on}")
        return [f"done-{r}" for r in requests]


async def _submit_all(batcher, items):
    """Submit (request, key, size) items in order, a moment apart, and gather results."""
    tasks = []
    for request, key, size in items:
        tasks.append(asyncio.create_task(batcher.submit(request, key, size)))
        await asyncio.sleep(0.001)
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_compatible_requests_share_one_call_in_arrival_order():
    run = Recorder()
    batcher = Batcher(run, max_batch_size=8, wait_s=0.05)
    results = asyncio.run(_submit_all(batcher, [(i, "k", 1) for i in range(4)]))
    assert run.calls == [[0, 1, 2, 3]]
    assert [r.result for r in results] == ["done-0", "done-1", "done-2", "done-3"]
    assert {r.batch_id for r in results} == {"b-1"}
    assert all(r.batch_images == 4 and r.batch_requests == 4 for r in results)


def test_incompatible_requests_run_in_separate_calls_oldest_key_first():
    run = Recorder()
    batcher = Batcher(run, max_batch_size=8, wait_s=0.05)
    items = [("a1", "A", 1), ("b1", "B", 1), ("a2", "A", 1), ("b2", "B", 1)]
    results = asyncio.run(_submit_all(batcher, items))
    assert run.calls == [["a1", "a2"], ["b1", "b2"]]
    assert [r.result for r in results] == ["done-a1", "done-b1", "done-a2", "done-b2"]


def test_a_higher_priority_request_runs_before_older_ones_with_its_compatible_ones():
    """While a call runs, two requests of priority 0 wait, then one of priority 5: it runs
    next, taking the older compatible one along (room for two), and the other runs last."""
    run = Recorder(delay=0.05)
    batcher = Batcher(run, max_batch_size=2, wait_s=0.0)

    async def main():
        busy = asyncio.create_task(batcher.submit("busy", "A", 1))
        await asyncio.sleep(0.01)
        low = [asyncio.create_task(batcher.submit(name, key, 1))
               for name, key in (("low-a", "A"), ("low-b", "B"))]
        await asyncio.sleep(0.001)
        high = asyncio.create_task(batcher.submit("high-b", "B", 1, priority=5))
        return await asyncio.gather(busy, *low, high)

    results = asyncio.run(main())
    assert run.calls == [["busy"], ["high-b", "low-b"], ["low-a"]]
    assert [r.result for r in results] == ["done-busy", "done-low-a", "done-low-b",
                                           "done-high-b"]


def test_num_outputs_count_against_the_batch_size():
    run = Recorder()
    batcher = Batcher(run, max_batch_size=4, wait_s=0.05)
    asyncio.run(_submit_all(batcher, [("x", "k", 3), ("y", "k", 2), ("z", "k", 1)]))
    assert run.calls == [["x"], ["y", "z"]]


def test_a_batch_holds_at_most_max_held_names_and_the_others_wait_their_turn():
    run = Recorder()
    batcher = Batcher(run, max_batch_size=8, wait_s=0.05, max_held=2)

    async def submit_all():
        holds = {"p": {"x"}, "q": {"y"}, "r": {"z"}, "s": {"x", "y"}, "t": set()}
        tasks = []
        for request, names in holds.items():
            tasks.append(asyncio.create_task(
                batcher.submit(request, "k", 1, holds=frozenset(names))))
            await asyncio.sleep(0.001)
        return await asyncio.gather(*tasks)

    asyncio.run(submit_all())
    # r would make three names with p and q; it leads the next batch instead.
    assert run.calls == [["p", "q", "s", "t"], ["r"]]


def test_a_request_larger_than_the_batch_runs_alone():
    run = Recorder()
    batcher = Batcher(run, max_batch_size=2, wait_s=0.01)
    results = asyncio.run(_submit_all(batcher, [("big", "k", 5)]))
    assert run.calls == [["big"]] and results[0].batch_images == 5


def test_a_full_batch_does_not_wait_for_the_window():
    run = Recorder()
    batcher = Batcher(run, max_batch_size=2, wait_s=30)
    results = asyncio.run(asyncio.wait_for(_submit_all(batcher, [(1, "k", 1), (2, "k", 1)]), 5))
    assert results[0].queue_s < 1


def test_a_lone_request_waits_about_the_window_then_runs():
    run = Recorder()
    batcher = Batcher(run, max_batch_size=8, wait_s=0.2)
    (result,) = asyncio.run(_submit_all(batcher, [(1, "k", 1)]))
    assert 0.18 <= result.queue_s < 1.0


def test_a_failing_request_fails_alone_and_its_batchmates_succeed():
    run = Recorder(fail_on="bad")
    batcher = Batcher(run, max_batch_size=8, wait_s=0.05)
    results = asyncio.run(_submit_all(batcher, [("ok1", "k", 1), ("bad", "k", 1), ("ok2", "k", 1)]))
    assert results[0].result == "done-ok1" and results[2].result == "done-ok2"
    assert isinstance(results[1], RuntimeError) and "bad" in str(results[1])
    # Split in halves (by images) until the failing request is alone.
    assert run.calls == [["ok1", "bad", "ok2"], ["ok1", "bad"], ["ok1"], ["bad"], ["ok2"]]


class MemoryBound(Recorder):
    """A runner whose device holds at most `limit` images per call, like a GPU that runs
    out of memory on larger batches."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    async def __call__(self, requests, withdrawn, on_step, on_preview):
        self.calls.append(list(requests))
        if sum(size for _, size in requests) > self.limit:
            raise MemoryError("out of memory")
        return [f"done-{name}" for name, _ in requests]


def test_a_batch_too_large_for_memory_is_split_in_halves_until_it_fits():
    run = MemoryBound(limit=2)
    batcher = Batcher(run, max_batch_size=8, wait_s=0.05)
    items = [((name, 1), "k", 1) for name in "abcde"] + [(("big", 3), "k", 3)]
    results = asyncio.run(_submit_all(batcher, items))
    names = [[name for name, _ in call] for call in run.calls]
    # 8 images fail; halves of 4 images (a-d) and 4 (e, big); then 2 + 2 fit; e alone
    # fits; big fails alone and only big gets the error.
    assert names == [list("abcde") + ["big"], list("abcd"), ["a", "b"], ["c", "d"],
                     ["e", "big"], ["e"], ["big"]]
    assert [r.result for r in results[:5]] == [f"done-{n}" for n in "abcde"]
    assert [r.batch_images for r in results[:5]] == [2, 2, 2, 2, 1]
    assert isinstance(results[5], MemoryError)


def test_a_cancelled_waiting_request_never_runs():
    async def scenario():
        run = Recorder()
        batcher = Batcher(run, max_batch_size=8, wait_s=0.1)
        keep = asyncio.create_task(batcher.submit("keep", "k"))
        drop = asyncio.create_task(batcher.submit("drop", "k"))
        await asyncio.sleep(0.01)
        drop.cancel()
        result = await keep
        with pytest.raises(asyncio.CancelledError):
            await drop
        return run.calls, result, batcher.queued

    calls, result, queued = asyncio.run(scenario())
    assert calls == [["keep"]] and result.result == "done-keep" and queued == 0


def test_the_window_is_counted_from_the_oldest_arrival():
    """A key that waited behind another batch runs at once when that batch ends."""

    async def scenario():
        run = Recorder(delay=0.3)
        batcher = Batcher(run, max_batch_size=8, wait_s=0.1)
        first = await _submit_all(batcher, [("a", "A", 1), ("b", "B", 1)])
        return first

    _, b = asyncio.run(scenario())
    # b arrived at ~0, waited for a's window (0.1) and call (0.3), not another window.
    assert 0.35 <= b.queue_s < 0.55


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError):
        Batcher(Recorder(), max_batch_size=0, wait_s=0)


def test_a_running_call_is_told_which_requests_were_withdrawn():
    async def scenario():
        run = Recorder(delay=0.3)
        batcher = Batcher(run, max_batch_size=8, wait_s=0)
        a = asyncio.create_task(batcher.submit("a", "k"))
        b = asyncio.create_task(batcher.submit("b", "k"))
        await asyncio.sleep(0.1)  # both are in the running call now
        a.cancel()
        await asyncio.sleep(0)
        first = run.withdrawn()
        b.cancel()
        await asyncio.sleep(0)
        return first, run.withdrawn(), run.calls

    partly, fully, calls = asyncio.run(scenario())
    assert calls == [["a", "b"]] and partly == {0} and fully == {0, 1}


def test_progress_reaches_the_requests_that_listen():
    async def scenario():
        run = Recorder()
        batcher = Batcher(run, max_batch_size=8, wait_s=0.01)
        seen = []
        await asyncio.gather(batcher.submit("a", "k", on_step=lambda s, t: seen.append((s, t))),
                             batcher.submit("b", "k"))
        await asyncio.sleep(0)
        return seen

    assert asyncio.run(scenario()) == [(1, 2)]


def test_partial_images_reach_only_their_own_request():
    async def scenario():
        batcher = Batcher(Recorder(), max_batch_size=8, wait_s=0.01)
        seen = []
        await asyncio.gather(batcher.submit("a", "k"),
                             batcher.submit("b", "k", on_preview=seen.append),
                             batcher.submit("c", "k"))
        await asyncio.sleep(0)
        return seen

    assert asyncio.run(scenario()) == ["partial-b"]


def test_a_failed_call_is_retried_without_its_withdrawn_requests():
    async def scenario():
        run = Recorder(fail_on="b", delay=0.2)
        batcher = Batcher(run, max_batch_size=8, wait_s=0)
        tasks = [asyncio.create_task(batcher.submit(r, "k")) for r in "abc"]
        await asyncio.sleep(0.1)
        tasks[0].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return run.calls, results

    calls, results = asyncio.run(scenario())
    assert calls == [["a", "b", "c"], ["b"], ["c"]]
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[1], RuntimeError) and results[2].result == "done-c"


class IdleRecorder:
    """An `on_idle` that records when it starts and ends, taking `pause` each time."""

    def __init__(self, events, pause=0.0):
        self.events, self.pause = events, pause

    async def __call__(self):
        self.events.append("idle")
        await asyncio.sleep(self.pause)
        self.events.append("idle done")


def test_on_idle_runs_after_every_idle_spell_and_never_while_requests_keep_coming():
    events: list = []
    run = Recorder()

    async def scenario():
        batcher = Batcher(run, max_batch_size=4, wait_s=0.0, idle_s=0.1,
                          on_idle=IdleRecorder(events))
        batcher.start()
        await asyncio.sleep(0.35)  # idle from the start: about three spells
        idle_at_first = events.count("idle")
        for i in range(12):  # a request every 40 ms: never 100 ms without one
            await batcher.submit(i, "k")
            await asyncio.sleep(0.04)
        return idle_at_first, events.count("idle") - idle_at_first

    idle_at_first, idle_while_busy = asyncio.run(scenario())
    assert 2 <= idle_at_first <= 4
    assert idle_while_busy == 0
    assert len(run.calls) == 12


def test_a_request_arriving_during_on_idle_runs_as_soon_as_it_returns():
    events: list = []

    async def runner(requests, withdrawn, on_step, on_preview):
        events.append(f"run {requests}")
        return requests

    async def scenario():
        batcher = Batcher(runner, max_batch_size=4, wait_s=0.0, idle_s=0.05,
                          on_idle=IdleRecorder(events, pause=0.2))
        batcher.start()
        await asyncio.sleep(0.1)  # inside the first idle call
        started = asyncio.get_running_loop().time()
        result = await batcher.submit("r", "k")
        return result.result, asyncio.get_running_loop().time() - started

    result, waited = asyncio.run(scenario())
    assert result == "r"
    assert events[:3] == ["idle", "idle done", "run ['r']"]
    assert 0.1 <= waited < 0.3  # the rest of the idle call, then at once


def test_idle_s_must_be_positive():
    with pytest.raises(ValueError, match="idle_s"):
        Batcher(Recorder(), max_batch_size=4, wait_s=0.0, idle_s=0, on_idle=IdleRecorder([]))
