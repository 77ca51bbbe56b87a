"""Tiling images over HTTP: `/generate`'s `tiling`, the same field in Replicate's SDXL
input and in OpenAI's `extra_body` draw the same pixels; FLUX models refuse it, naming the
field in each API's shape."""

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.integration.conftest import AUTH, FAST, FLUX, decode, pixels

BODY = {"prompt": "a tiled floor", "steps": 3, "seed": 31, "guidance_scale": 6,
        "scheduler": "K_EULER", "width": 64, "height": 64}


def test_every_api_draws_the_same_tiling_image(client, rep, oai):
    tiled = pixels(decode(client.post("/generate", json=BODY | {"tiling": True})
                          .json()["image"]))
    plain = pixels(decode(client.post("/generate", json=BODY).json()["image"]))
    assert abs(tiled - plain).mean() > 0.5
    (file,) = rep.run(FAST, input={"prompt": BODY["prompt"], "num_inference_steps": 3,
                                   "seed": 31, "guidance_scale": 6, "scheduler": "K_EULER",
                                   "width": 64, "height": 64, "tiling": True})
    assert (pixels(Image.open(io.BytesIO(file.read()))) == tiled).all()
    (item,) = oai.images.generate(model=FAST, prompt=BODY["prompt"], size="64x64",
                                  extra_body={"tiling": True, "seed": 31, "guidance_scale": 6,
                                              "scheduler": "K_EULER",
                                              "num_inference_steps": 3}).data
    drawn = pixels(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB"))
    assert (drawn == tiled).all()


def test_flux_models_refuse_tiling_naming_the_field(base_url, oai):
    r = httpx.post(f"{base_url}/generate", headers=AUTH,
                   json={"prompt": "x", "model": FLUX, "tiling": True})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "tiling"
    with pytest.raises(openai.BadRequestError) as refused:
        oai.images.generate(model=FLUX, prompt="x", extra_body={"tiling": True})
    assert refused.value.body["param"] == "tiling"
    r = httpx.post(f"{base_url}/v1/models/{FLUX}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "tiling": True}})
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == "input.tiling"
