"""Predictions and files in a real Redis, shared by two ingress replicas, surviving restarts.

A second app (route prefix /shared) with two ingress replicas and the Redis store runs
beside the main test app.
"""

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import AUTH, _model

MODEL = "atelier/tiny-sdxl-shared"
SHARED_LIMITED = "test-key-shared-limit-4"  # 4 generation requests per minute


@pytest.fixture(scope="module")
def shared_url(base_url, redis_url, cache_dir):
    from ray import serve

    from serve.app import build_app

    config = {"cache_dir": str(cache_dir), "redis_url": redis_url, "ingress_replicas": 2,
              "api_keys": [AUTH["Authorization"].split()[1],
                           {"key": SHARED_LIMITED, "requests_per_minute": 4}],
              "models": [_model(MODEL, 1500)]}
    serve.run(build_app({"atelier": config}), name="atelier-shared", route_prefix="/shared")
    yield f"{base_url}/shared"
    serve.delete("atelier-shared")


def _create(url):
    r = httpx.post(f"{url}/v1/models/{MODEL}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "seed": 9}})
    assert r.status_code == 201, r.text
    return r.json()["id"], r.headers["x-atelier-ingress"]


def _get(url, pid):
    r = httpx.get(f"{url}/v1/predictions/{pid}", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json(), r.headers["x-atelier-ingress"]


def _wait_done(url, pid, timeout=30, failover=False):
    """Poll until the prediction ends. In a failover, a poll the proxy had sent to the dead
    replica may time out or fail; a client polls again, and so does this."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body, _ = _get(url, pid)
        except (AssertionError, httpx.HTTPError):
            if not failover:
                raise
            time.sleep(0.5)
            continue
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"{pid} did not finish")


def _wait_both_ingresses(url, timeout=90):
    """Return once both ingress replicas answer again (the killed one restarted)."""
    deadline, seen = time.monotonic() + timeout, set()
    while time.monotonic() < deadline and len(seen) < 2:
        try:
            r = httpx.get(f"{url}/healthz", timeout=2)
            if r.status_code == 200:
                seen.add(r.headers["x-atelier-ingress"])
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    assert len(seen) == 2, f"only {seen} answered after the restart"


def test_a_prediction_made_through_one_replica_is_read_through_the_other(shared_url):
    pid, owner = _create(shared_url)
    seen = {owner}
    for _ in range(40):
        body, replica = _get(shared_url, pid)
        seen.add(replica)
        assert body["id"] == pid
    assert len(seen) == 2
    done = _wait_done(shared_url, pid)
    assert done["status"] == "succeeded"
    downloads = [httpx.get(done["output"][0]) for _ in range(20)]
    assert all(r.status_code == 200 and r.content.startswith(b"\x89PNG") for r in downloads)
    assert len({r.headers["x-atelier-ingress"] for r in downloads}) == 2  # both, from Redis


def test_a_prediction_is_canceled_through_the_other_replica(shared_url):
    for _ in range(15):
        pid, owner = _create(shared_url)
        r = httpx.post(f"{shared_url}/v1/predictions/{pid}/cancel", headers=AUTH)
        if r.headers["x-atelier-ingress"] != owner:
            break
    else:
        pytest.fail("every cancel landed on the owning replica")
    assert r.json()["status"] == "canceled"
    time.sleep(2.5)  # past the model's window: a request still queued would have run
    body = _wait_done(shared_url, pid)
    assert body["status"] == "canceled" and body["output"] is None


def _png(r):
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=int)


def test_uploads_and_outputs_are_inputs_through_either_replica_with_no_fetch(shared_url):
    """This app allows no image hosts: its own files are read from Redis, never fetched."""
    first = _wait_done(shared_url, _create(shared_url)[0])
    photo = httpx.get(first["output"][0])
    r = httpx.post(f"{shared_url}/v1/files", headers=AUTH,
                   files={"content": ("photo.png", photo.content, "image/png")})
    assert r.status_code == 201, r.text
    upload = r.json()
    seen = {httpx.get(upload["urls"]["get"], headers=AUTH).headers["x-atelier-ingress"]
            for _ in range(20)}
    assert len(seen) == 2
    for url in (first["output"][0], upload["urls"]["get"]):
        r = httpx.post(f"{shared_url}/v1/models/{MODEL}/predictions", headers=AUTH,
                       json={"input": {"prompt": "y", "image": url, "prompt_strength": 0}})
        assert r.status_code == 201, r.text
        again = _wait_done(shared_url, r.json()["id"])
        assert np.array_equal(_png(httpx.get(again["output"][0])), _png(photo))
    r = httpx.post(f"{shared_url}/v1/models/{MODEL}/predictions", headers=AUTH,
                   json={"input": {"prompt": "y", "image": "http://127.0.0.1:9/a.png"}})
    assert r.status_code == 422 and "image_allowed_hosts" in r.json()["detail"]

def test_predictions_and_files_survive_an_ingress_restart(shared_url):
    import ray

    pid, _ = _create(shared_url)
    before = _wait_done(shared_url, pid)
    for name in ray.util.list_named_actors(all_namespaces=True):
        if "atelier-shared#Ingress" in name["name"]:
            ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]), no_restart=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            after, _ = _get(shared_url, pid)
            break
        except (AssertionError, httpx.HTTPError):
            time.sleep(0.5)
    else:
        pytest.fail("the ingress did not come back")
    assert after["output"] == before["output"] and after["status"] == "succeeded"
    assert httpx.get(after["output"][0]).content.startswith(b"\x89PNG")
    assert httpx.get(f"{shared_url}/healthz").status_code == 200  # open under a prefix too
    _wait_both_ingresses(shared_url)


def test_predictions_of_a_killed_ingress_replica_are_adopted_and_finish(shared_url):
    import ray

    taken = {}
    for seed in range(6):  # long enough to be running when the replica is killed
        r = httpx.post(f"{shared_url}/v1/models/{MODEL}/predictions", headers=AUTH,
                       json={"input": {"prompt": "x", "seed": seed, "width": 256,
                                       "height": 256, "num_inference_steps": 20}})
        assert r.status_code == 201
        taken[r.json()["id"]] = r.headers["x-atelier-ingress"]
    victim = next(iter(taken.values()))
    (actor,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "atelier-shared#Ingress" in a["name"] and a["name"].endswith(victim)]
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
    killed_at = time.monotonic()

    # Its leases lapse within 15 s; the surviving (or restarted) replica runs them again.
    done = {pid: _wait_done(shared_url, pid, timeout=120, failover=True) for pid in taken}
    assert [b["status"] for b in done.values()] == ["succeeded"] * len(taken)
    victims = [pid for pid, owner in taken.items() if owner == victim]
    for pid in victims:
        assert f"{victim}; running it again" not in done[pid]["logs"]
        assert "stopped; running it again on" in done[pid]["logs"]
        assert done[pid]["output"] and httpx.get(done[pid]["output"][0]).status_code == 200
    print(f"{len(victims)} predictions adopted; all done "
          f"{time.monotonic() - killed_at:.1f} s after the kill")
    _wait_both_ingresses(shared_url)


def test_both_replicas_sign_webhooks_with_the_one_secret_kept_in_redis(shared_url):
    answers = [httpx.get(f"{shared_url}/v1/webhooks/default/secret", headers=AUTH)
               for _ in range(20)]
    assert len({r.headers["x-atelier-ingress"] for r in answers}) == 2
    keys = {r.json()["key"] for r in answers}
    assert len(keys) == 1 and keys.pop().startswith("whsec_")


def test_both_replicas_draw_from_one_rate_bucket_in_redis(shared_url):
    headers = {"Authorization": f"Bearer {SHARED_LIMITED}"}
    answers = [httpx.post(f"{shared_url}/v1/models/{MODEL}/predictions", headers=headers,
                          json={"input": {"prompt": "x", "seed": i}}) for i in range(8)]
    assert [r.status_code for r in answers] == [201] * 4 + [429] * 4
    assert len({r.headers["x-atelier-ingress"] for r in answers}) == 2
