import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import asked_until, counts_by_model
from tests.integration.conftest import API_KEY


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {API_KEY}", "Bearer",
                                    f"Bearer {API_KEY}x"])
def test_without_the_key_every_api_route_is_401(base_url, header):
    headers = {"Authorization": header} if header else {}
    for method, path in [("POST", "/generate?prompt=x&seed=1"), ("GET", "/v1/models"),
                         ("GET", "/v1/loras"), ("POST", "/v1/images/generations")]:
        r = httpx.request(method, base_url + path, headers=headers, json={"prompt": "x"})
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert API_KEY not in r.text


@pytest.mark.parametrize("scheme", ["Bearer", "Token", "bearer"])
def test_the_key_opens_the_api_in_both_schemes(base_url, scheme):
    r = httpx.get(base_url + "/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"})
    assert r.status_code == 200 and r.json()["object"] == "list"


def test_health_needs_no_key(base_url):
    r = httpx.get(base_url + "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_openai_errors_keep_the_openai_shape_for_401(base_url):
    r = httpx.post(base_url + "/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_a_keys_rate_limit_answers_429_in_each_apis_shape_and_spares_the_others(base_url):
    """team-a's key may make 3 generation requests a minute (one more every 20 s)."""
    import openai

    from tests.integration.conftest import FAST, LIMITED_KEY

    limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
    body = {"prompt": "a cat", "model": FAST, "seed": 1}
    left = []
    for _ in range(3):
        r = httpx.post(f"{base_url}/generate", headers=limited, json=body, timeout=60)
        assert r.status_code == 200, r.text
        left.append(r.headers["x-ratelimit-remaining-requests"])
        assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert left == ["2", "1", "0"]
    r = httpx.post(f"{base_url}/generate", headers=limited, json=body)
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 20
    assert "team-a is over its 3 requests per minute" in r.json()["detail"]
    # Reading is free; other keys are not affected.
    assert httpx.get(f"{base_url}/v1/predictions", headers=limited).status_code == 200
    ok = httpx.post(f"{base_url}/generate", headers={"Authorization": f"Bearer {API_KEY}"},
                    json=body, timeout=60)
    assert ok.status_code == 200 and "x-ratelimit-limit-requests" not in ok.headers
    oai = openai.OpenAI(api_key=LIMITED_KEY, base_url=f"{base_url}/v1", max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        oai.images.generate(model=FAST, prompt="x")
    assert err.value.code == "rate_limit_exceeded"
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", headers=limited,
                   json={"input": {"prompt": "x"}})
    assert r.status_code == 429 and r.json()["status"] == 429
    assert r.headers["content-type"] == "application/problem+json"


def test_a_keys_image_rate_counts_each_requests_images_in_every_api(base_url):
    """team-b's key may ask for 6 images a minute (one more every 10 s), whatever the
    number of requests; a refused request takes none."""
    import openai
    import replicate
    from replicate.exceptions import ReplicateError

    from tests.integration.conftest import FAST, IMAGES_KEY

    team_b = {"Authorization": f"Bearer {IMAGES_KEY}"}
    body = {"prompt": "a cat", "model": FAST, "seed": 1}
    r = httpx.post(f"{base_url}/generate", headers=team_b, json={**body, "num_outputs": 4},
                   timeout=60)
    assert r.status_code == 200 and len(r.json()["images"]) == 4
    assert "x-ratelimit-limit-requests" not in r.headers  # no request rate for this key
    r = httpx.post(f"{base_url}/generate", headers=team_b, json={**body, "num_outputs": 3})
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 10
    assert "team-b is over its 6 images per minute (this request asks for 3)" in (
        r.json()["detail"])
    r = httpx.post(f"{base_url}/generate", headers=team_b, json={**body, "num_outputs": 2},
                   timeout=60)
    assert r.status_code == 200 and len(r.json()["images"]) == 2
    oai = openai.OpenAI(api_key=IMAGES_KEY, base_url=f"{base_url}/v1", max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        oai.images.generate(model=FAST, prompt="x", n=2)
    assert err.value.code == "rate_limit_exceeded"
    rep = replicate.Client(api_token=IMAGES_KEY, base_url=base_url)
    newest = _newest_prediction(base_url, team_b)
    with pytest.raises(ReplicateError) as err:
        rep.models.predictions.create(model=FAST, input={"prompt": "x", "num_outputs": 2})
    assert err.value.status == 429
    assert _newest_prediction(base_url, team_b) == newest  # the refused one was never made


def _newest_prediction(base_url, headers):
    listed = httpx.get(f"{base_url}/v1/predictions", headers=headers).json()["results"]
    return listed[0]["id"] if listed else None


def test_a_key_limited_to_some_models_sees_and_uses_only_those_in_every_api(base_url):
    """team-c's key may use the batched SDXL and FLUX: the others are not served to it."""
    import openai
    import replicate

    from tests.integration.conftest import BATCHED, FAST, FLUX, MODELS_KEY

    headers = {"Authorization": f"Bearer {MODELS_KEY}"}
    listed = httpx.get(f"{base_url}/v1/models", headers=headers).json()
    assert [m["id"] for m in listed["data"]] == [BATCHED, FLUX]
    assert [m["name"] for m in listed["results"]] == ["tiny-sdxl-batched", "tiny-flux"]
    default = httpx.post(f"{base_url}/generate", headers=headers, timeout=60,
                         json={"prompt": "x", "seed": 1, "steps": 1})
    assert default.status_code == 200 and default.json()["model"] == BATCHED
    refused = httpx.post(f"{base_url}/generate", headers=headers,
                         json={"prompt": "x", "model": "stability-ai/sdxl"})
    assert refused.status_code == 404
    assert refused.json()["detail"].endswith(f"served: {BATCHED}, {FLUX}")
    oai = openai.OpenAI(api_key=MODELS_KEY, base_url=f"{base_url}/v1", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        oai.images.generate(model=FAST, prompt="x")
    rep = replicate.Client(api_token=MODELS_KEY, base_url=base_url)
    with pytest.raises(replicate.exceptions.ReplicateError) as caught:
        rep.models.get(FAST)
    assert caught.value.status == 404
    assert rep.models.get("black-forest-labs/flux-dev").name == "tiny-flux"
    assert [d.name for d in rep.deployments.list()] == ["tiny-sdxl-batched", "tiny-flux"]
    for path in (f"/v1/loras?model={FAST}", f"/v1/deployments/{FAST}",
                 f"/v1/models/{FAST}/versions"):
        r = httpx.get(base_url + path, headers=headers)
        assert r.status_code == 404 and f"model '{FAST}' is not served here" in r.text, path
    everything = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert len(everything.json()["data"]) > 2
    unknown = httpx.post(f"{base_url}/v1/predictions", headers=headers,
                         json={"version": "0" * 64, "input": {"prompt": "x"}})
    assert unknown.status_code == 404
    assert unknown.json()["detail"].endswith(f"served: {BATCHED}, {FLUX}")


def test_a_key_limited_to_some_models_lists_only_the_adapters_they_can_use(base_url):
    from tests.integration.conftest import BATCHED, FLUX, MODELS_KEY

    def names(key, **params):
        r = httpx.get(f"{base_url}/v1/loras", params=params,
                      headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        return {row["name"] for row in r.json()["data"]}

    usable = names(API_KEY, model=BATCHED) | names(API_KEY, model=FLUX)
    assert names(MODELS_KEY) == usable
    assert "for-other" in names(API_KEY) - usable  # the adapter for a base nobody serves


def test_each_key_sees_and_cancels_only_its_own_predictions(base_url):
    """An operator's key (sees_all_predictions) sees every key's."""
    from tests.integration.conftest import BATCHED, MODELS_KEY, OPS_KEY

    mine, theirs = ({"Authorization": f"Bearer {k}"} for k in (MODELS_KEY, API_KEY))
    made = httpx.post(f"{base_url}/v1/models/{BATCHED}/predictions", headers=mine,
                      json={"input": {"prompt": "x", "num_inference_steps": 1}}).json()
    other = httpx.post(f"{base_url}/v1/models/{BATCHED}/predictions", headers=theirs,
                       json={"input": {"prompt": "y", "num_inference_steps": 1}}).json()
    path = f"{base_url}/v1/predictions/{made['id']}"
    assert httpx.get(path, headers=mine).json()["id"] == made["id"]
    assert httpx.get(path, headers=theirs).status_code == 404
    assert httpx.post(f"{path}/cancel", headers=theirs).status_code == 404
    ops = {"Authorization": f"Bearer {OPS_KEY}"}
    listed = {k: [p["id"] for p in httpx.get(f"{base_url}/v1/predictions",
                                                headers=h).json()["results"]]
              for k, h in (("mine", mine), ("theirs", theirs), ("ops", ops))}
    assert made["id"] in listed["mine"] and other["id"] not in listed["mine"]
    assert other["id"] in listed["theirs"] and made["id"] not in listed["theirs"]
    assert {made["id"], other["id"]} <= set(listed["ops"])
    assert httpx.get(path, headers=ops).json()["id"] == made["id"]
    canceled = httpx.post(f"{path}/cancel", headers=mine).json()
    assert canceled["id"] == made["id"]


def test_each_key_sees_and_deletes_only_its_own_uploads(base_url):
    """Uploads belong to the key's name, as predictions do: another key's are a 404 (and
    unlisted), an operator's key sees every one; the upload's URL names it as an input."""
    import io

    import replicate

    from tests.integration.conftest import FAST, MODELS_KEY, OPS_KEY
    from tests.pictures import png_bytes, scene

    mine, theirs, ops = (replicate.Client(api_token=k, base_url=base_url)
                         for k in (MODELS_KEY, API_KEY, OPS_KEY))
    photo = png_bytes(scene())
    made, other = (c.files.create(io.BytesIO(photo), filename=f"{n}.png")
                   for c, n in ((mine, "mine"), (theirs, "theirs")))
    listed = {n: [f.id for f in c.files.list()]
              for n, c in (("mine", mine), ("theirs", theirs), ("ops", ops))}
    assert made.id in listed["mine"] and other.id not in listed["mine"]
    assert other.id in listed["theirs"] and made.id not in listed["theirs"]
    assert {made.id, other.id} <= set(listed["ops"])
    path = f"{base_url}/v1/files/{made.id}"
    auth = {n: {"Authorization": f"Bearer {k}"} for n, k in (("theirs", API_KEY),
                                                             ("ops", OPS_KEY))}
    for suffix in ("", "/download"):
        assert httpx.get(path + suffix, headers=auth["theirs"]).status_code == 404
    assert httpx.delete(path, headers=auth["theirs"]).status_code == 404
    assert mine.files.get(made.id).name == "mine.png"  # still there
    assert httpx.get(f"{path}/download", headers=auth["ops"]).content == photo
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", headers=auth["theirs"],
                   json={"input": {"prompt": "x", "image": other.urls["get"],
                                   "prompt_strength": 0, "output_format": "png"}},
                   timeout=60)
    assert r.status_code == 201, r.text
    assert mine.files.delete(made.id) is True
    assert httpx.get(path, headers=auth["ops"]).status_code == 404


def test_a_keys_file_listing_reads_its_own_uploads_a_page_at_a_time(base_url):
    from tests.integration.conftest import URGENT_KEY

    auth = {"Authorization": f"Bearer {URGENT_KEY}"}
    made = [httpx.post(f"{base_url}/v1/files", headers=auth,
                       files={"content": (f"{i}.txt", f"note {i}".encode(), "text/plain")}
                       ).json()["id"] for i in range(101)]
    first = httpx.get(f"{base_url}/v1/files", headers=auth).json()
    assert [f["id"] for f in first["results"]] == made[:0:-1]  # newest first, 100 a page
    assert first["next"] == f"{base_url}/v1/files?cursor={made[1]}"
    rest = httpx.get(first["next"], headers=auth).json()
    assert [f["id"] for f in rest["results"]] == [made[0]] and rest["next"] is None
    for upload_id in made:
        assert httpx.delete(f"{base_url}/v1/files/{upload_id}", headers=auth).status_code == 204
    assert httpx.get(f"{base_url}/v1/files", headers=auth).json()["results"] == []


def test_a_key_past_its_unfinished_predictions_is_refused_until_one_ends(base_url,
                                                                        metrics_port):
    """team-e may have 2 unfinished predictions at once; BATCHED holds each for 2 s. Its
    refusals are counted by key, as those over a rate are."""
    import replicate
    from replicate.exceptions import ReplicateError

    from tests.integration.conftest import BATCHED, QUEUE_KEY

    auth = {"Authorization": f"Bearer {QUEUE_KEY}"}
    url = f"{base_url}/v1/models/{BATCHED}/predictions"
    with ThreadPoolExecutor(4) as pool:  # sent at once: each is counted as it is let in
        made = sorted(pool.map(lambda i: httpx.post(url, headers=auth, json={
            "input": {"prompt": "x", "seed": i}}), range(4)), key=lambda r: r.status_code)
    assert [r.status_code for r in made] == [201, 201, 429, 429]
    assert [r.headers["retry-after"] for r in made[2:]] == ["5", "5"]
    assert "team-e has 2 unfinished predictions" in made[2].json()["detail"]
    with pytest.raises(ReplicateError) as refused:  # the official client, as Replicate's
        replicate.Client(api_token=QUEUE_KEY, base_url=base_url).predictions.create(
            model=BATCHED, input={"prompt": "x"})
    assert refused.value.status == 429
    counted = asked_until(lambda: counts_by_model(
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text,
        "ray_atelier_rate_limited_total", "key").get("team-e", 0), lambda n: n >= 3)
    assert counted == 3
    other = httpx.post(url, headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"input": {"prompt": "x"}})
    assert other.status_code == 201  # another key has room
    for r in made[:2]:
        done = httpx.get(r.json()["urls"]["get"], headers=auth, timeout=5)
        deadline = time.monotonic() + 60
        while done.json()["status"] not in ("succeeded", "failed") and \
                time.monotonic() < deadline:
            time.sleep(0.2)
            done = httpx.get(r.json()["urls"]["get"], headers=auth, timeout=5)
        assert done.json()["status"] == "succeeded"
    again = httpx.post(url, headers={**auth, "Prefer": "wait=30"},
                       json={"input": {"prompt": "x", "seed": 9}}, timeout=60)
    assert again.status_code == 201 and again.json()["status"] == "succeeded"
