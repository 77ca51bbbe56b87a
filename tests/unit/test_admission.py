"""The ingress's admission to a model's replicas: a place for each request the replicas
hold, the rest waiting by priority, then by arrival; a full queue gives a newcomer of
higher priority the place of the newest of the lowest; withdrawn waiters leave."""

import asyncio

import pytest

from serve.admission import Admission
from serve.errors import Overloaded


def _run(body):
    return asyncio.run(body())


class _Log:
    """Requests that hold a place until released, and the order they got one in."""

    def __init__(self, admission: Admission):
        self.admission, self.order, self.release = admission, [], {}

    def start(self, name: str, priority: int = 0) -> asyncio.Task:
        release = self.release[name] = asyncio.Event()

        async def request():
            async with self.admission.slot(priority):
                self.order.append(name)
                await release.wait()
        return asyncio.create_task(request())

    async def settle(self):
        for _ in range(5):
            await asyncio.sleep(0)


def test_waiters_go_by_priority_then_arrival_as_places_free():
    counts = []

    async def body():
        log = _Log(Admission("m", 2, 10, counts.append))
        tasks = [log.start("a"), log.start("b"), log.start("low1", -1), log.start("c"),
                 log.start("urgent", 5), log.start("d")]
        await log.settle()
        assert log.order == ["a", "b"] and log.admission.waiting == 4
        for name in ("a", "b", "urgent", "c", "d", "low1"):
            log.release[name].set()
            await log.settle()
        await asyncio.gather(*tasks)
        return log.order, log.admission

    order, admission = _run(body)
    assert order == ["a", "b", "urgent", "c", "d", "low1"]
    assert (admission.running, admission.waiting) == (0, 0)
    assert counts[:4] == [1, 2, 3, 4] and counts[-1] == 0


def test_a_full_queue_refuses_newcomers_unless_they_outrank_the_newest_lowest():
    async def body():
        log = _Log(Admission("m", 1, 2))
        running, old, young = log.start("run"), log.start("old"), log.start("young")
        await log.settle()
        with pytest.raises(Overloaded, match="2 requests wait"):
            async with log.admission.slot(0):
                pass
        urgent = log.start("urgent", 3)
        await log.settle()
        with pytest.raises(Overloaded, match="higher priority took this one's place"):
            await young
        for name in ("run", "urgent", "old"):
            log.release[name].set()
            await log.settle()
        await asyncio.gather(running, old, urgent)
        return log.order

    assert _run(body) == ["run", "urgent", "old"]


def test_a_withdrawn_waiter_leaves_and_one_let_through_as_it_left_passes_its_place_on():
    async def body():
        log = _Log(Admission("m", 1, 5))
        running, gone, kept = log.start("run"), log.start("gone"), log.start("kept")
        await log.settle()
        gone.cancel()
        await log.settle()
        assert log.admission.waiting == 1
        # Let through and withdrawn before it ran: the place goes to the next.
        late = log.start("late")
        await log.settle()
        log.release["run"].set()
        await asyncio.sleep(0)  # "kept" is let through; withdrawn before it resumes
        kept.cancel()
        await log.settle()
        log.release["late"].set()
        await asyncio.gather(running, late)
        for task in (gone, kept):
            assert task.cancelled()
        return log.order, log.admission

    order, admission = _run(body)
    assert order == ["run", "late"] and (admission.running, admission.waiting) == (0, 0)


def test_no_queue_refuses_whatever_finds_the_places_taken():
    async def body():
        admission = Admission("m", 1, 0)
        async with admission.slot(0):
            with pytest.raises(Overloaded):
                async with admission.slot(100):
                    pass
        async with admission.slot(0):
            return admission.running

    assert _run(body) == 1


def test_resizing_lets_waiters_through_or_holds_newcomers_until_under_the_new_size():
    async def body():
        log = _Log(Admission("m", 1, 10))
        tasks = [log.start(name) for name in ("a", "b", "c", "d")]
        await log.settle()
        assert log.order == ["a"]
        log.admission.resize(3)  # an autoscaled model's second and third replicas run
        await log.settle()
        assert log.order == ["a", "b", "c"] and log.admission.waiting == 1
        log.admission.resize(0)  # (never under one)
        assert log.admission.capacity == 1
        for name in ("a", "b"):
            log.release[name].set()
        await log.settle()
        assert log.order == ["a", "b", "c"]  # c still runs: d waits
        log.release["c"].set()
        await log.settle()
        assert log.order == ["a", "b", "c", "d"]
        log.release["d"].set()
        await asyncio.gather(*tasks)
        return log.admission

    admission = _run(body)
    assert (admission.running, admission.waiting) == (0, 0)
