"""A model with a safety checker, through each API: flagged images are black on /generate
(as diffusers' pipelines answer), left out on Replicate's and OpenAI's (a request left with
none fails as theirs do), and kept when a request turns the check off.

CHECKED's checker flags the image of CHECKED_PROMPT's seed 10 and passes seed 11's."""

import base64
import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import counts_by_model
from tests.integration.conftest import API_KEY, CHECKED, CHECKED_PROMPT, decode, pixels

_BOTH = {"model": CHECKED, "prompt": CHECKED_PROMPT, "seed": 10, "num_outputs": 2}


@pytest.fixture(scope="module")
def unchecked(base_url):
    """The two images with the check turned off: seed 10's, seed 11's."""
    r = httpx.post(f"{base_url}/generate", json={**_BOTH, "disable_safety_checker": True},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 200 and "nsfw_content_detected" not in r.json(), r.text
    assert "X-Atelier-NSFW-Content-Detected" not in r.headers
    return [decode(b64) for b64 in r.json()["images"]]


def test_generate_answers_a_flagged_image_black_and_says_which(client, unchecked):
    r = client.post("/generate", json=_BOTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["nsfw_content_detected"] == [True, False] and body["seeds"] == [10, 11]
    assert r.headers["X-Atelier-NSFW-Content-Detected"] == "true,false"
    flagged, kept = (pixels(decode(b64)) for b64 in body["images"])
    assert flagged.shape == (64, 64, 3) and flagged.max() == 0
    assert pixels(unchecked[0]).std() > 1  # what was withheld was an image
    assert np.array_equal(kept, pixels(unchecked[1]))
    alone = client.post("/generate", json={**_BOTH, "seed": 11, "num_outputs": 1},
                        headers={"Accept": "image/png"})
    assert alone.headers["X-Atelier-NSFW-Content-Detected"] == "false"
    assert np.abs(pixels(Image.open(io.BytesIO(alone.content))) - pixels(unchecked[1])).max() <= 1


def test_replicate_leaves_flagged_images_out_and_fails_when_none_is_left(rep, unchecked):
    from replicate.exceptions import ModelError

    inputs = {"prompt": CHECKED_PROMPT, "seed": 10, "num_outputs": 2, "output_format": "png"}
    prediction = rep.predictions.create(model=CHECKED, input=inputs)
    prediction.wait()
    assert prediction.status == "succeeded", prediction.error
    assert len(prediction.output) == 1 and "NSFW content detected in image 0" in prediction.logs
    (kept,) = rep.run(CHECKED, input=inputs)
    assert np.array_equal(pixels(Image.open(io.BytesIO(kept.read()))), pixels(unchecked[1]))
    with pytest.raises(ModelError) as failed:
        rep.run(CHECKED, input={**inputs, "num_outputs": 1})
    assert failed.value.prediction.error == ("NSFW content detected. Try running it again, "
                                             "or try a different prompt.")
    both = rep.run(CHECKED, input={**inputs, "disable_safety_checker": True})
    assert [pixels(Image.open(io.BytesIO(f.read()))).max() > 0 for f in both] == [True, True]


def test_openai_leaves_flagged_images_out_and_refuses_when_none_is_left(oai, unchecked):
    resp = oai.images.generate(model=CHECKED, prompt=CHECKED_PROMPT, n=2,
                               extra_body={"seed": 10})
    (kept,) = resp.data
    png = Image.open(io.BytesIO(base64.b64decode(kept.b64_json)))
    assert np.array_equal(pixels(png), pixels(unchecked[1]))
    with pytest.raises(openai.BadRequestError) as refused:
        oai.images.generate(model=CHECKED, prompt=CHECKED_PROMPT, extra_body={"seed": 10})
    assert refused.value.body["code"] == "content_policy_violation"
    with pytest.raises(openai.APIError, match="NSFW content detected"):
        list(oai.images.generate(model=CHECKED, prompt=CHECKED_PROMPT, stream=True,
                                 extra_body={"seed": 10}))


def test_flagged_images_are_counted_for_the_model(metrics_port, client):
    def flagged() -> float:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        return counts_by_model(text, "ray_atelier_safety_flagged_images_total").get(CHECKED, 0)

    before = flagged()
    assert client.post("/generate", json=_BOTH).json()["nsfw_content_detected"][0]
    deadline = time.monotonic() + 30
    while flagged() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert flagged() >= before + 1
