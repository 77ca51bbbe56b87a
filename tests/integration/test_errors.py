import pytest

from tests.integration.conftest import FAST, ONE_SLOT, post_many


@pytest.mark.parametrize("query, body, loc", [
    ("?prompt=x&width=65", None, ["query", "width"]),
    ("?prompt=x&width=abc", None, ["query", "width"]),
    ("?width=64", None, ["query", "prompt"]),
    ("", {"width": 64}, ["body", "prompt"]),
    ("", {"prompt": ""}, ["body", "prompt"]),
    ("", {"prompt": "x", "height": 4096}, ["body", "height"]),
    ("", {"prompt": "x", "width": 512, "height": 512}, ["body", "width"]),
    ("", {"prompt": "x", "steps": 0}, ["body", "steps"]),
    ("", {"prompt": "x", "steps": 61}, ["body", "steps"]),
    ("", {"prompt": "x", "num_outputs": 5}, ["body", "num_outputs"]),
    ("", {"prompt": "x", "seed": -1}, ["body", "seed"]),
    ("", {"prompt": "x", "seed": 2**32}, ["body", "seed"]),
    ("", {"prompt": "x", "scheduler": "LMS"}, ["body", "scheduler"]),
    ("", {"prompt": "x", "output_format": "gif"}, ["body", "output_format"]),
    ("", {"prompt": "x", "guidance_scale": "high"}, ["body", "guidance_scale"]),
    ("", {"prompt": "x", "guidance_rescale": 1.5}, ["body", "guidance_rescale"]),
    ("", {"prompt": "x", "model": "atelier/tiny-flux", "guidance_rescale": 0.5},
     ["body", "guidance_rescale"]),
    ("", {"prompt": "x", "colour": "red"}, ["body", "colour"]),
    ("?prompt=x&colour=red", None, ["query", "colour"]),
])
def test_bad_input_is_422_naming_the_field(client, query, body, loc):
    r = client.post(f"/generate{query}", json=body) if body else client.post(f"/generate{query}")
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["detail"]]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_422(client, raw):
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]


def test_unknown_model_is_404_listing_the_served_ones(client):
    r = client.post("/generate", json={"prompt": "x", "model": "acme/nope"})
    assert r.status_code == 404
    assert "acme/nope" in r.json()["detail"] and FAST in r.json()["detail"]


def test_server_keeps_serving_after_bad_requests(client):
    for _ in range(3):
        client.post("/generate", json={"prompt": "x", "width": 7})
    r = client.post("/generate", json={"prompt": "x", "seed": 9})
    assert r.status_code == 200 and r.json()["seed"] == 9


def test_requests_past_the_queue_limit_get_503_with_retry_after_at_once(base_url):
    # One request runs (it waits 1.5 s for company) and one waits in the queue; the rest
    # are refused without waiting. Serve counts its queue per caller without a lock, so
    # on a loaded machine a request still being assigned may count as queued, or a few
    # more may be let in (runs of this suite have seen 1 and 4 of 5, and 5 of 8, served).
    # The test allows for that, not for hanging: of 8 requests, at most 6 are served (all 8
    # would be without the limit) and the rest are refused at once. The first is sent
    # 0.5 s ahead, so it reaches the replica.
    responses = post_many(base_url, [{"prompt": "x", "seed": s, "model": ONE_SLOT}
                                     for s in range(8)], lead_s=0.5)
    ok = [(seed, r) for seed, r in enumerate(responses) if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    assert 1 <= len(ok) <= 6 and len(refused) >= 2 and len(ok) + len(refused) == 8
    assert all(r.json()["seed"] == seed for seed, r in ok)
    for r in refused:
        assert r.headers.get("retry-after") == "1" and "busy" in r.json()["detail"], (r.headers, r.text)
        assert r.elapsed.total_seconds() < 1.0
