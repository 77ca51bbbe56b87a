"""The Redis store stops answering: requests that need it get 503 with Retry-After in
their API's shape, never a 500; those that do not still generate; and once it answers
again, so does everything, a prediction that was running meanwhile included.

A third app (route prefix /outage) keeps its state in a Redis of its own, which the tests
stop and start again on the same port (it writes every change to its append-only file, so
a restart finds the state it held).
"""

import time

import httpx
import pytest

from tests.conftest import free_port, start_redis
from tests.integration.conftest import AUTH, _model, decode, pixels

MODEL = "atelier/tiny-sdxl-outage"
LIMITED = "test-key-outage-limited"  # a request rate, kept in the store


class _Redis:
    def __init__(self, folder):
        self.port, self.folder, self.proc = free_port(), folder, None

    def start(self) -> None:
        self.proc = start_redis(self.port, self.folder, appendonly=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def outage(base_url, cache_dir, tmp_path_factory):
    from ray import serve

    from serve.app import build_app

    redis = _Redis(tmp_path_factory.mktemp("outage-redis"))
    redis.start()
    config = {"cache_dir": str(cache_dir), "redis_url": f"redis://127.0.0.1:{redis.port}/0",
              "api_keys": [AUTH["Authorization"].split()[1],
                           {"key": LIMITED, "requests_per_minute": 100}],
              "models": [_model(MODEL, 0, limits={"max_steps": 60})]}
    serve.run(build_app({"atelier": config}), name="atelier-outage", route_prefix="/outage")
    try:
        yield f"{base_url}/outage", redis
    finally:
        serve.delete("atelier-outage")
        if redis.proc.poll() is None:
            redis.stop()


def _predict(url: str, **inp) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{MODEL}/predictions", headers=AUTH, timeout=30,
                      json={"input": {"prompt": "a lamp", "seed": 4, **inp}})


def _finished(url: str, pid: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/v1/predictions/{pid}", headers=AUTH, timeout=30)
        if r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "canceled"):
            return r.json()
        time.sleep(0.5)
    raise AssertionError(f"{pid} did not finish")


def _healthz_store(url: str, state: str) -> dict:
    """/healthz's `store` once it reads `state` (each ingress replica asks every 5 s)."""
    deadline = time.monotonic() + 20
    while (store := httpx.get(f"{url}/healthz", timeout=30).json()["store"])["state"] != state:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return store


def _exported_store(metrics_port: int) -> list[float]:
    """The app's store gauges on Ray's metrics port, once one reads 0 (or after 40 s)."""
    deadline, values = time.monotonic() + 40, []
    while 0.0 not in values and time.monotonic() < deadline:
        time.sleep(1)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("ray_atelier_store_available{")
                  and 'application="atelier-outage"' in line]
    return values


def test_without_the_store_requests_that_need_it_get_503_and_the_rest_generate(
        outage, metrics_port):
    url, redis = outage
    assert _healthz_store(url, "ok") == {"kind": "redis", "state": "ok"}
    redis.stop()
    try:
        prediction = _predict(url)
        assert prediction.status_code == 503, prediction.text
        assert prediction.headers["retry-after"] == "5"
        assert prediction.headers["content-type"].startswith("application/problem+json")
        assert prediction.json()["type"] == "store_unavailable"
        openai = httpx.post(f"{url}/v1/images/generations", headers=AUTH, timeout=30, json={
            "model": MODEL, "prompt": "a lamp", "response_format": "url"})
        assert openai.status_code == 503 and openai.headers["retry-after"] == "5"
        assert openai.json()["error"]["code"] == "store_unavailable"
        limited = httpx.post(f"{url}/generate", timeout=30, json={"prompt": "a lamp"},
                             headers={"Authorization": f"Bearer {LIMITED}"})
        assert limited.status_code == 503 and limited.headers["retry-after"] == "5"
        assert "Redis" in limited.json()["detail"]
        # Images answered inline need no store.
        inline = httpx.post(f"{url}/generate", headers=AUTH, timeout=60,
                            json={"prompt": "a lamp", "seed": 4})
        assert inline.status_code == 200 and pixels(decode(inline.json()["image"])).std() > 1
        # The ingress still serves, and says why predictions fail, as the gauge does.
        assert httpx.get(f"{url}/healthz").status_code == 200
        store = _healthz_store(url, "unavailable")
        assert store["state"] == "unavailable" and "Connection" in store["message"], store
        assert 0.0 in _exported_store(metrics_port)
    finally:
        redis.start()
    assert _healthz_store(url, "ok") == {"kind": "redis", "state": "ok"}
    again = _predict(url)
    assert again.status_code == 201, again.text
    body = _finished(url, again.json()["id"], 60)
    assert body["status"] == "succeeded" and len(body["output"]) == 1


def test_a_prediction_running_while_the_store_is_gone_runs_again_once_it_answers(outage):
    url, redis = outage
    created = _predict(url, num_inference_steps=60, width=256, height=256)  # (about 3 s)
    assert created.status_code == 201, created.text
    pid = created.json()["id"]
    redis.stop()
    time.sleep(10)  # (longer than the prediction's run: its end cannot be stored)
    redis.start()
    # Its lease lapses, and the replica adopts it and runs it again from its input.
    body = _finished(url, pid, 90)
    assert body["status"] == "succeeded", body
    assert "running it again" in body["logs"]
    image = httpx.get(body["output"][0], timeout=30)
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
