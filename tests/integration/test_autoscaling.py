"""An autoscaled model (`autoscaling`: one replica, two at most, aiming at one request per
replica) adds a replica under load, which then serves, and gives it back once idle.

Requests past what an autoscaled model's running replicas hold wait in the ingress's queue
by their API key's priority, and go to each replica added: a second app (route prefix
/prio) serves a model whose replicas hold one request each, one to four of them."""

import threading
import time

import httpx
import pytest

from tests.integration.conftest import AUTH, AUTOSCALED, URGENT_KEY, _model

PRIO = "atelier/tiny-sdxl-prio"
URGENT = {"Authorization": f"Bearer {URGENT_KEY}"}


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


@pytest.fixture(scope="module")
def prio_url(base_url, cache_dir):
    from ray import serve

    from serve.app import build_app

    config = {"cache_dir": str(cache_dir),
              "api_keys": [AUTH["Authorization"].split()[1],
                           {"key": URGENT_KEY, "priority": 9}],
              "models": [_model(PRIO, 0, batching={"max_batch_size": 1, "wait_ms": 0},
                                max_ongoing_requests=1, limits={"max_steps": 60},
                                autoscaling={"max_replicas": 4, "target_ongoing_requests": 0.5,
                                             "upscale_delay_s": 5, "downscale_delay_s": 600})]}
    serve.run(build_app({"atelier": config}), name="atelier-prio", route_prefix="/prio")
    yield f"{base_url}/prio"
    serve.delete("atelier-prio")


def _post(url: str, headers: dict, done: dict, name: str) -> None:
    # (about 2 s each on a 2-core CPU, so that the first is still running when the last
    # is sent)
    sent = time.monotonic()
    r = httpx.post(f"{url}/generate", headers=headers, timeout=120,
                   json={"model": PRIO, "prompt": "a lamp", "seed": 1, "steps": 60,
                         "width": 256, "height": 256})
    done[name] = (time.monotonic(), r.status_code, r.headers.get("X-Atelier-Replica"), sent)


def test_requests_past_the_running_replicas_wait_by_priority(prio_url):
    health = httpx.get(f"{prio_url}/healthz").json()["models"][PRIO]
    assert health["replicas_running"] == 1
    done, threads = {}, []
    for name, headers in [("low1", AUTH), ("low2", AUTH), ("low3", AUTH), ("low4", AUTH),
                          ("urgent", URGENT)]:
        threads.append(threading.Thread(target=_post, args=(prio_url, headers, done, name)))
        threads[-1].start()
        time.sleep(0.15)  # (they arrive in this order, while low1 runs)
    for t in threads:
        t.join()
    assert {status for _, status, _, _ in done.values()} == {200}, done
    assert done["urgent"][3] < done["low1"][0], "low1 was done before urgent was sent"
    # One replica holds low1; the others wait at the ingress, where the urgent one (priority
    # 9) goes first. Let through to Serve's queue, low2-low4 would have gone before it.
    finished = sorted(done, key=lambda name: done[name][0])
    assert finished[:2] == ["low1", "urgent"], finished


def test_requests_go_to_each_replica_the_autoscaler_adds(prio_url):
    stop, replicas = threading.Event(), set()

    def closed_loop():
        while not stop.is_set():
            done = {}
            _post(prio_url, AUTH, done, "r")
            replicas.add(done["r"][2])

    clients = [threading.Thread(target=closed_loop) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        # Four clients against replicas holding one each, aiming at half a request each:
        # replicas are added, and as each runs the ingress lets through one more request.
        assert _until(lambda: len(replicas) >= 2, 150), replicas
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert httpx.get(f"{prio_url}/healthz").json()["models"][PRIO]["replicas_running"] >= 2
