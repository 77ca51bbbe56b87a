"""A model replica's health check (ModelDeployment.check_health): the check of its weights,
which waits for the work queued on the device, leaves the event loop free, and a stalled
call is found without it."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from serve.config import ModelConfig
from serve.errors import ReplicaLost

MODEL = ModelConfig(id="a/sdxl", embedded="tiny-sdxl", health_stall_s=1)


class _Device:
    """An engine whose weights' check waits, as reading them on a GPU waits for the work
    queued there, until `done` is set (at most 5 s); it records the thread it ran on."""

    def __init__(self):
        self.done, self.threads = threading.Event(), []

    def check(self):
        self.threads.append(threading.current_thread().name)
        self.done.wait(5)


def _replica(engine, workers, running_since=None):
    """The replica's state check_health reads: its batcher answers the held requests with
    the error `failed` records."""
    failed = []
    batcher = SimpleNamespace(start=lambda: None, running_since=running_since,
                              fail_all=failed.append)
    return SimpleNamespace(cfg=MODEL, engine=engine, batcher=batcher, _failures=0,
                           _refresh_gauges=lambda: None, _workers=workers), failed


def _check_health(replica):
    from deployments.model import ModelDeployment

    return ModelDeployment.func_or_class.check_health(replica)


def test_the_weights_check_runs_on_a_worker_thread_while_the_loop_goes_on():
    engine = _Device()

    async def check_while_ticking() -> int:
        ticks = 0
        check = asyncio.ensure_future(_check_health(replica))
        threading.Timer(0.3, engine.done.set).start()  # the device's queue drains
        while not check.done():
            await asyncio.sleep(0.01)
            ticks += 1
        await check  # healthy: no error
        return ticks

    with ThreadPoolExecutor(2, thread_name_prefix="encode-read") as workers:
        replica, failed = _replica(engine, workers)
        ticks = asyncio.run(check_while_ticking())
    # About 30 ticks of 10 ms while the check waited 0.3 s; none if it held the loop.
    assert ticks >= 10, ticks
    assert len(engine.threads) == 1 and engine.threads[0].startswith("encode-read")
    assert failed == []


def test_a_stalled_call_fails_the_check_without_waiting_on_the_device():
    engine = _Device()  # never drains: its check would wait 5 s
    with ThreadPoolExecutor(2, thread_name_prefix="encode-read") as workers:
        replica, failed = _replica(engine, workers, running_since=time.monotonic() - 3)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="a pipeline call has run for over 1.0s"):
            asyncio.run(_check_health(replica))
        elapsed = time.monotonic() - started
    assert elapsed < 1 and engine.threads == []
    (answer,) = failed  # the requests it held are answered, their callers retry elsewhere
    assert isinstance(answer, ReplicaLost) and "is unhealthy" in str(answer)
