import asyncio

import httpx
import pytest

from tests.integration.conftest import AUTH, FAST, ONE_SLOT, URGENT_KEY, post_many


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


@pytest.mark.parametrize("method, path, status, allow", [
    ("GET", "/v1/images/generations", 405, "POST"),
    ("POST", "/v1/images/upscales", 404, None),
    ("GET", "/v1/predictions/abc/logs", 404, None),
    ("GET", "/v1/predictions/abc/cancel", 405, "POST"),
])
def test_unknown_paths_and_methods_answer_in_their_apis_error_shape(client, method, path,
                                                                     status, allow):
    r = client.request(method, path)
    assert r.status_code == status and r.headers.get("allow") == allow, r.text
    kind = "not_found" if status == 404 else "method_not_allowed"
    if path.startswith("/v1/images"):  # OpenAI's shape
        assert r.json() == {"error": {"message": r.json()["error"]["message"], "param": None,
                                      "type": "invalid_request_error", "code": kind}}
    else:  # Replicate's problem details
        assert r.headers["content-type"] == "application/problem+json"
        assert (r.json()["type"], r.json()["status"]) == (kind, status)


def test_a_path_of_no_api_is_fastapis_plain_404(client):
    r = client.get("/nothing-here")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


def test_server_keeps_serving_after_bad_requests(client):
    for _ in range(3):
        client.post("/generate", json={"prompt": "x", "width": 7})
    r = client.post("/generate", json={"prompt": "x", "seed": 9})
    assert r.status_code == 200 and r.json()["seed"] == 9


def test_a_request_of_higher_priority_takes_the_place_of_the_newest_lower_one(base_url):
    """The one-slot model runs one request and queues one (at the ingress): a request of
    team-d's key (priority 9) arriving at the full queue takes the place of the waiting
    one (priority 0), which is refused at once (503, Retry-After) while the running one
    goes on. Which of the first two got there first is the machine's business; each runs
    for seconds (4 images of 256x256, 20 steps)."""
    body = {"prompt": "x", "model": ONE_SLOT, "width": 256, "height": 256, "steps": 20,
            "num_outputs": 4}

    async def run():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
            tasks = []
            for seed, key in ((1, None), (2, None), (3, URGENT_KEY)):
                headers = AUTH if key is None else {"Authorization": f"Bearer {key}"}
                small = {"width": 64, "height": 64, "num_outputs": 1} if key else {}
                tasks.append(asyncio.create_task(c.post(
                    "/generate", headers=headers, json=body | small | {"seed": seed})))
                await asyncio.sleep(0.3)
            return await asyncio.gather(*tasks)

    first, second, urgent = asyncio.run(run())
    assert urgent.status_code == 200 and urgent.json()["seed"] == 3, urgent.text
    (served,), (pushed,) = ([r for r in (first, second) if r.status_code == code]
                            for code in (200, 503))
    assert served.json()["seed"] in (1, 2)
    assert pushed.headers.get("retry-after") == "1"
    assert "higher priority took this one's place" in pushed.json()["detail"]


def test_requests_past_the_queue_limit_get_503_with_retry_after_at_once(base_url):
    # One request runs (for seconds: 4 images of 256x256, 20 steps) and one waits in the
    # queue (at the ingress, which counts exactly); the other six, sent 20 ms apart, are
    # refused without waiting. The first is sent 0.5 s ahead, so it reaches the replica.
    responses = post_many(base_url, [{"prompt": "x", "seed": s, "model": ONE_SLOT,
                                      "width": 256, "height": 256, "steps": 20,
                                      "num_outputs": 4} for s in range(8)], lead_s=0.5)
    ok = [(seed, r) for seed, r in enumerate(responses) if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    assert len(ok) == 2 and len(refused) == 6, [r.status_code for r in responses]
    assert all(r.json()["seed"] == seed for seed, r in ok)
    for r in refused:
        assert r.headers.get("retry-after") == "1" and "busy" in r.json()["detail"], (r.headers, r.text)
        assert r.elapsed.total_seconds() < 1.0
