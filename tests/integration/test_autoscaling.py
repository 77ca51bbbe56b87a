"""An autoscaled model (`autoscaling`: one replica, two at most, aiming at one request per
replica) adds a replica under load, which then serves, and gives it back once idle."""

import threading
import time

import httpx

from tests.integration.conftest import AUTH, AUTOSCALED


def _health(client) -> dict:
    return client.get("/healthz").json()["models"][AUTOSCALED]


def _until(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_a_replica_is_added_under_load_and_removed_once_idle(base_url, client):
    idle = _health(client)
    assert (idle["replicas_running"], idle["replicas_range"]) == (1, [1, 2])
    stop, replicas, statuses = threading.Event(), set(), []

    def closed_loop():
        with httpx.Client(base_url=base_url, headers=AUTH, timeout=120) as c:
            while not stop.is_set():
                r = c.post("/generate", json={"model": AUTOSCALED, "prompt": "a red cube",
                                              "steps": 8})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    replicas.add(r.headers["X-Atelier-Replica"])

    clients = [threading.Thread(target=closed_loop) for _ in range(6)]
    for t in clients:
        t.start()
    try:
        # Six requests held against a target of one per replica: a second replica starts,
        # and requests reach it.
        assert _until(lambda: len(replicas) == 2, 150), replicas
        under_load = _health(client)
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert under_load["replicas_running"] == 2 and under_load["state"] == "ready"
    assert set(statuses) == {200}, statuses
    # Idle, it goes back to one replica past the downscale delay.
    assert _until(lambda: _health(client)["replicas_running"] == 1, 150), _health(client)
