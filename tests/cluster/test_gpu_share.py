"""Two models on one GPU (`gpu_share: 0.5` each): a Ray node declaring one GPU places both
replicas on it, both serve, and the GPU is then taken whole. The GPU is a Ray resource only
(the replicas compute on CPU); Ray still gives each replica its GPU id, which is what
placement is about. With a whole GPU each, the second replica could never be placed.

The node's GPU is of a type (RTX-PRO-6000, the resource Ray gives a server of such cards),
which one of the models asks for (`accelerator_type`).

A model of two replicas with room for one (a server down) serves on that one, and the
requests it cannot hold wait at the ingress by priority."""

import logging
import os
import threading
import time

import httpx
import pytest

from tests.integration.conftest import AUTH, URGENT_KEY, _free_port, decode, pixels

MODELS = ("atelier/tiny-sdxl-a", "atelier/tiny-sdxl-b")
GPU_TYPE = "RTX-PRO-6000"


@pytest.fixture(scope="module")
def shared_gpu(cache_dir):
    import ray
    from ray import serve

    from serve.app import build_app

    # Serve says which replicas wait to be placed after this long (30 s unset).
    os.environ["RAY_SERVE_SLOW_STARTUP_WARNING_S"] = "2"
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False,
             resources={f"accelerator_type:{GPU_TYPE}": 1})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"atelier": {"cache_dir": str(cache_dir), "models": [
            {"id": model, "embedded": "tiny-sdxl", "dtype": "float32", "gpu_share": 0.5,
             "num_cpus": 1, "batching": {"max_batch_size": 1, "wait_ms": 0},
             "defaults": {"width": 64, "height": 64, "num_inference_steps": 2}}
            | ({"accelerator_type": GPU_TYPE} if model == MODELS[0] else {})
            for model in MODELS]}}), name="atelier", route_prefix="/")
        yield ray, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("RAY_SERVE_SLOW_STARTUP_WARNING_S", None)


@pytest.mark.timeout(300)
def test_two_models_with_half_a_gpu_each_serve_from_the_one_gpu(shared_gpu):
    ray, url = shared_gpu
    answers = [httpx.post(f"{url}/generate", json={"prompt": "x", "seed": 3, "model": model},
                          timeout=60) for model in MODELS]
    assert [r.status_code for r in answers] == [200, 200]
    assert [r.json()["model"] for r in answers] == list(MODELS)
    assert [r.headers["x-atelier-gpu"] for r in answers] == ["0", "0"]
    assert len({r.headers["x-atelier-node"] for r in answers}) == 1
    assert len({r.headers["x-atelier-replica"] for r in answers}) == 2
    # The same tiny model, seed and settings: the same pixels from either replica (the
    # files differ in the model id they are labelled with).
    first, second = (pixels(decode(r.json()["image"])) for r in answers)
    assert (first == second).all() and first.std() > 1
    assert ray.available_resources().get("GPU", 0) == 0


@pytest.mark.timeout(60)
def test_the_model_pinned_to_the_gpu_type_holds_it_and_the_hardware_is_listed(shared_gpu):
    ray, url = shared_gpu
    # Ray places an actor of an accelerator type by a sliver of the type's resource.
    assert ray.available_resources()[f"accelerator_type:{GPU_TYPE}"] == pytest.approx(0.999)
    assert httpx.get(f"{url}/v1/hardware").json() == [
        {"sku": "cpu", "name": "CPU", "count": 4, "servers": 1},
        {"sku": "gpu-rtx-pro-6000", "name": "RTX PRO 6000 GPU", "count": 1, "servers": 1}]
    deployments = httpx.get(f"{url}/v1/deployments").json()["results"]
    assert {d["name"]: d["current_release"]["configuration"]["hardware"]
            for d in deployments} == {"tiny-sdxl-a": "gpu-rtx-pro-6000", "tiny-sdxl-b": "auto"}


@pytest.mark.timeout(120)
def test_a_model_pinned_to_a_gpu_type_no_server_has_waits_and_says_why(shared_gpu, cache_dir,
                                                                       caplog):
    from ray import serve

    from serve.app import build_app

    model = {"id": "atelier/tiny-sdxl-h100", "embedded": "tiny-sdxl", "dtype": "float32",
             "device": "cuda", "accelerator_type": "H100", "num_cpus": 1,
             "request_timeout_s": 5}  # (its replica, never started, is stopped in 15 s)
    log = logging.getLogger("ray.serve.atelier.ingress")
    log.addHandler(caplog.handler)
    try:
        app = build_app({"atelier": {"cache_dir": str(cache_dir), "models": [model]}})
    finally:
        log.removeHandler(caplog.handler)
    assert ("atelier/tiny-sdxl-h100: no server of the cluster has H100 GPUs now (its GPU "
            f"types: {GPU_TYPE}); its replicas wait for one") in caplog.text
    _, url = shared_gpu
    # (serve.run waits for the app to run, which this one never does; its own
    # non-waiting form is private.)
    serve._run(app, name="atelier-h100", route_prefix="/h100", _blocking=False)
    try:
        deadline, health = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            r = httpx.get(f"{url}/h100/healthz")
            health = r.json()["models"][model["id"]] if r.status_code == 503 else None
            if health and "accelerator_type:H100" in health.get("message", ""):
                break
            time.sleep(1)
        assert health and health["state"] == "not_ready", health
        assert health["replicas_running"] == 0 and "to be scheduled" in health["message"]
    finally:
        serve.delete("atelier-h100")


def _post(url: str, key: str, model: str, done: dict, name: str) -> None:
    # (about 2 s each on a 2-core CPU alone, 6 to 8 s in a full run: at 128 x 128 and 40
    # steps, 0.6 s, the first request was done before the last one was sent)
    sent = time.monotonic()
    r = httpx.post(f"{url}/generate", headers={"Authorization": f"Bearer {key}"}, timeout=180,
                   json={"model": model, "prompt": "a lamp", "seed": 1, "steps": 60,
                         "width": 256, "height": 256})
    done[name] = (time.monotonic(), r.status_code, r.headers.get("X-Atelier-Replica"), sent)


@pytest.mark.timeout(420)
def test_a_model_short_of_a_replica_lets_through_what_it_runs_and_the_rest_wait_by_priority(
        shared_gpu, cache_dir):
    from ray import serve

    from serve.app import build_app

    # Two replicas of two CPUs each, where two CPUs are free: one is placed, the other
    # waits, as a replica whose server is down does.
    model = {"id": "atelier/tiny-sdxl-two", "embedded": "tiny-sdxl", "dtype": "float32",
             "device": "cpu", "replicas": 2, "num_cpus": 2, "max_ongoing_requests": 1,
             "batching": {"max_batch_size": 1, "wait_ms": 0}, "request_timeout_s": 150,
             "limits": {"max_steps": 60}}
    plain = AUTH["Authorization"].split()[1]
    serve._run(build_app({"atelier": {"cache_dir": str(cache_dir), "models": [model],
                                      "api_keys": [plain, {"key": URGENT_KEY, "priority": 9}]}}),
               name="atelier-two", route_prefix="/two", _blocking=False)
    _, url = shared_gpu
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and not (health or {}).get("replicas_running"):
            time.sleep(1)
            r = httpx.get(f"{url}/two/healthz")
            health = r.json()["models"][model["id"]] if r.status_code in (200, 503) else None
        assert health and (health["replicas_running"], health["replicas_wanted"]) == (1, 2), health.get("message")
        time.sleep(2)  # (the ingress reads the running replicas every second)
        done, threads = {}, []
        for name, key in [("low1", plain), ("low2", plain), ("low3", plain), ("low4", plain),
                          ("urgent", URGENT_KEY)]:
            threads.append(threading.Thread(target=_post,
                                            args=(f"{url}/two", key, model["id"], done, name)))
            threads[-1].start()
            time.sleep(0.15)  # (they arrive in this order, while low1 runs)
        for t in threads:
            t.join()
        assert {status for _, status, _, _ in done.values()} == {200}, done
        assert len({replica for _, _, replica, _ in done.values()}) == 1
        assert done["urgent"][3] < done["low1"][0], "low1 was done before urgent was sent"
        # The one replica holds low1; the others wait at the ingress, where the urgent one
        # goes first. Let through for two replicas, low2 would have waited in Serve's queue
        # for the one running, and gone before it.
        finished = sorted(done, key=lambda name: done[name][0])
        assert finished[:2] == ["low1", "urgent"], finished
    finally:
        serve.delete("atelier-two")
