"""Out of memory: a request over the model's memory budget is refused before the GPU; a
batch that runs out of memory (the model's out-of-memory drill: calls of more than two
images fail as a full GPU would) is split and retried, and only a request that does not fit
alone fails."""

import time

import replicate

from tests.integration.conftest import (
    API_KEY,
    FAST,
    SMALL_MEMORY,
    assert_same_pixels,
    decode,
    post_many,
)


def _body(seed, **extra):
    return {"model": SMALL_MEMORY, "prompt": f"a vase {seed}", "seed": seed, **extra}


def test_a_request_over_the_memory_budget_gets_422_before_it_runs(client):
    r = client.post("/generate", json=_body(1, num_outputs=4))
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "num_outputs"] and "12288 pixels" in err["msg"]
    assert client.post("/generate", json=_body(1, num_outputs=2)).status_code == 200


def test_a_batch_that_runs_out_of_memory_is_split_and_every_request_succeeds(base_url,
                                                                             client):
    responses = post_many(base_url, [_body(s) for s in (40, 41, 42, 43)])
    assert [r.status_code for r in responses] == [200] * 4
    # The call of four failed; its halves of two fitted.
    assert [r.headers["x-atelier-batch-size"] for r in responses] == ["2"] * 4
    assert len({r.headers["x-atelier-batch-id"] for r in responses}) == 2
    for seed, r in zip((40, 41, 42, 43), responses, strict=True):
        alone = client.post("/generate", json={**_body(seed), "model": FAST})
        assert_same_pixels(decode(alone.json()["image"]), decode(r.json()["image"]))


def test_a_request_that_does_not_fit_alone_fails_clearly_and_its_batchmate_succeeds(
        base_url, client):
    big, small = post_many(base_url, [_body(50, num_outputs=3), _body(51)])
    assert big.status_code == 503 and big.headers["retry-after"] == "1"
    assert "ran out of memory for 1 request(s), 3 image(s) of 64x64" in big.json()["detail"]
    assert small.status_code == 200 and small.headers["x-atelier-batch-size"] == "1"
    rep = replicate.Client(api_token=API_KEY, base_url=base_url)
    p = rep.models.predictions.create(model=SMALL_MEMORY,
                                      input={"prompt": "x", "seed": 5, "num_outputs": 3})
    p.wait()
    assert p.status == "failed" and "ran out of memory" in p.error


def test_running_out_of_memory_does_not_make_the_replica_unhealthy(client):
    replica = client.post("/generate", json=_body(60)).headers["x-atelier-replica"]
    for seed in range(61, 65):  # more than the three failures in a row a replica survives
        assert client.post("/generate", json=_body(seed, num_outputs=3)).status_code == 503
    time.sleep(2.5)  # two health checks (every second for this model)
    assert client.get("/healthz").json()["models"][SMALL_MEMORY]["state"] == "ready"
    after = client.post("/generate", json=_body(65))
    assert after.status_code == 200 and after.headers["x-atelier-replica"] == replica
