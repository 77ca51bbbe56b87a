"""The ingress's watch on its store (serve.store_health) against a real Redis that stops
and starts again, and the memory store, which always answers."""

import asyncio
import os
import signal
import time

from serve.redis_state import REDIS_TIMEOUT_S, RedisStore
from serve.state import MemoryStore
from serve.store_health import StoreHealth, ask, watch_store
from tests.conftest import free_port, start_redis


class _Gauge:
    """Stands for IngressMetrics: the store gauge's values, in order."""

    def __init__(self):
        self.values: list[bool] = []

    def store(self, available: bool) -> None:
        self.values.append(available)


def test_redis_that_stops_is_reported_with_its_error_and_again_once_it_answers(tmp_path):
    port = free_port()
    health, gauge = StoreHealth("redis"), _Gauge()
    servers = [start_redis(port, tmp_path)]

    def stop() -> None:
        servers[-1].terminate()
        servers[-1].wait(10)

    async def watched() -> list[dict]:
        store, seen = RedisStore(f"redis://127.0.0.1:{port}/0", 60), []
        for then in (stop, lambda: servers.append(start_redis(port, tmp_path)), stop):
            await ask(store, health, gauge)
            seen.append(health.as_json())
            then()
        return seen

    try:
        up, down, again = asyncio.run(watched())
    finally:
        stop()
    assert up == again == {"kind": "redis", "state": "ok"}
    assert down["state"] == "unavailable" and down["kind"] == "redis"
    assert "Connection" in down["message"], down  # Redis's own words (closed, or refused)
    assert gauge.values == [True, False, True] and health.available


def test_redis_that_stops_answering_is_unavailable_after_its_time_out(tmp_path):
    """A paused Redis keeps its connections open and never answers: the store gives up
    after REDIS_TIMEOUT_S rather than waiting without end."""
    port = free_port()
    health, gauge, server = StoreHealth("redis"), _Gauge(), start_redis(port, tmp_path)

    async def watched() -> list[tuple[dict, float]]:
        store, seen = RedisStore(f"redis://127.0.0.1:{port}/0", 60), []
        for then in (signal.SIGSTOP, signal.SIGCONT, None):
            started = time.monotonic()
            await asyncio.wait_for(ask(store, health, gauge), 3 * REDIS_TIMEOUT_S)
            seen.append((health.as_json(), time.monotonic() - started))
            if then is not None:
                os.kill(server.pid, then)
        return seen

    try:
        (up, _), (paused, waited), (again, _) = asyncio.run(watched())
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.terminate()
        server.wait(10)
    assert up == again == {"kind": "redis", "state": "ok"}
    assert paused["state"] == "unavailable" and "Timeout" in paused["message"], paused
    assert REDIS_TIMEOUT_S <= waited < 2 * REDIS_TIMEOUT_S
    assert gauge.values == [True, False, True]


def test_the_watch_asks_again_every_period_and_the_memory_store_always_answers():
    health, gauge = StoreHealth("memory"), _Gauge()

    async def watched_for(seconds: float) -> None:
        task = asyncio.create_task(watch_store(MemoryStore(60, 2**20), health, gauge, 0.05))
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(watched_for(0.32))
    assert 5 <= len(gauge.values) <= 8 and all(gauge.values), gauge.values
    assert health.as_json() == {"kind": "memory", "state": "ok"}
