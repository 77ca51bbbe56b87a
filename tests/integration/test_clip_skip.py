"""Reading prompts from an earlier text-encoder layer over HTTP: `/generate`'s `clip_skip`,
the same field in Replicate's SDXL input and in OpenAI's `extra_body` draw the same pixels;
a layer the model's text encoders lack is refused by its replica, naming the field,
without touching a request sent with it; FLUX models refuse the field."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from tests.integration.conftest import AUTH, FAST, FLUX, decode, pixels

BODY = {"prompt": "a lighthouse at dusk", "steps": 3, "seed": 41, "guidance_scale": 6,
        "scheduler": "K_EULER", "width": 64, "height": 64, "negative_prompt": "blurry"}


def test_every_api_draws_the_same_image_read_one_layer_back(client, rep, oai):
    skipped = pixels(decode(client.post("/generate", json=BODY | {"clip_skip": 1})
                            .json()["image"]))
    plain = pixels(decode(client.post("/generate", json=BODY).json()["image"]))
    assert abs(skipped - plain).mean() > 0.5
    same = pixels(decode(client.post("/generate", json=BODY | {"clip_skip": 0})
                         .json()["image"]))
    assert (same == plain).all()
    (file,) = rep.run(FAST, input={"prompt": BODY["prompt"], "num_inference_steps": 3,
                                   "seed": 41, "guidance_scale": 6, "scheduler": "K_EULER",
                                   "width": 64, "height": 64, "negative_prompt": "blurry",
                                   "clip_skip": 1})
    assert (pixels(Image.open(io.BytesIO(file.read()))) == skipped).all()
    (item,) = oai.images.generate(model=FAST, prompt=BODY["prompt"], size="64x64",
                                  extra_body={"clip_skip": 1, "seed": 41, "guidance_scale": 6,
                                              "scheduler": "K_EULER", "negative_prompt":
                                              "blurry", "num_inference_steps": 3}).data
    drawn = pixels(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB"))
    assert (drawn == skipped).all()


def test_a_layer_the_encoders_lack_is_refused_alone(base_url, oai):
    """The tiny model's text encoders have two layers: clip_skip 2 is past them. The good
    request sent at the same time draws its usual image."""
    def post(body):
        return httpx.post(f"{base_url}/generate", headers=AUTH, json=body, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        bad, good = pool.map(post, [BODY | {"clip_skip": 2}, BODY])
    assert bad.status_code == 422, bad.text
    assert bad.json()["detail"][0]["loc"][-1] == "clip_skip"
    assert "at most 1" in bad.json()["detail"][0]["msg"]
    assert good.status_code == 200
    alone = pixels(decode(post(BODY).json()["image"]))
    assert (pixels(decode(good.json()["image"])) == alone).all()
    with pytest.raises(openai.BadRequestError) as refused:
        oai.images.generate(model=FAST, prompt="x", size="64x64",
                            extra_body={"clip_skip": 2, "num_inference_steps": 3})
    assert refused.value.body["param"] == "clip_skip"


def test_flux_models_refuse_the_field_and_models_list_their_default(base_url, client):
    r = httpx.post(f"{base_url}/generate", headers=AUTH,
                   json={"prompt": "x", "model": FLUX, "clip_skip": 1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "clip_skip"
    r = httpx.post(f"{base_url}/v1/models/{FLUX}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "clip_skip": 1}})
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == "input.clip_skip"
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models[FAST]["prompts"]["clip_skip"] == 0
