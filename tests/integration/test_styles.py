"""Named styles over HTTP: `/generate`'s `style`, Replicate's input and OpenAI's own `style`
draw what the styled prompt and negative prompt draw; a model without styles ignores
OpenAI's DALL-E 3 values and refuses the field elsewhere."""

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.integration.conftest import AUTH, BATCHED, FAST, decode, pixels

SETTINGS = {"seed": 17, "guidance_scale": 6, "scheduler": "K_EULER", "width": 64,
            "height": 64}


def _png(data: bytes):
    return pixels(Image.open(io.BytesIO(data)).convert("RGB"))


def test_each_api_draws_the_styled_prompt(client, rep, oai):
    styled = pixels(decode(client.post("/generate", json={
        "prompt": "cinematic still of a lighthouse, film grain", "negative_prompt": "cartoon",
        "steps": 3} | SETTINGS).json()["image"]))
    by_name = pixels(decode(client.post("/generate", json={
        "prompt": "a lighthouse", "style": "cinematic", "steps": 3} | SETTINGS).json()["image"]))
    assert (by_name == styled).all()
    plain = pixels(decode(client.post("/generate", json={
        "prompt": "a lighthouse", "steps": 3} | SETTINGS).json()["image"]))
    assert abs(plain - styled).mean() > 0.5
    (file,) = rep.run(FAST, input={"prompt": "a lighthouse", "style": "cinematic",
                                   "num_inference_steps": 3} | SETTINGS)
    assert (_png(file.read()) == styled).all()
    (item,) = oai.images.generate(model=FAST, prompt="a lighthouse", style="cinematic",
                                  size="64x64", extra_body={
                                      "num_inference_steps": 3, "seed": 17,
                                      "guidance_scale": 6, "scheduler": "K_EULER"}).data
    assert (_png(base64.b64decode(item.b64_json)) == styled).all()
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed[FAST]["styles"] == {"cinematic": {
        "prompt": "cinematic still of {prompt}, film grain", "negative_prompt": "cartoon"}}
    assert listed[BATCHED]["styles"] == {}


def test_unknown_styles_are_refused_and_dalle_styles_ignored_without_styles(base_url, oai):
    r = httpx.post(f"{base_url}/generate", headers=AUTH,
                   json={"prompt": "x", "style": "noir", "width": 64, "height": 64})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "style"
    assert "one of cinematic" in r.text
    with pytest.raises(openai.BadRequestError) as refused:
        oai.images.generate(model=FAST, prompt="x", style="vivid", size="64x64")
    assert refused.value.body["param"] == "style"
    (item,) = oai.images.generate(model=BATCHED, prompt="x", style="vivid", size="64x64",
                                  extra_body={"num_inference_steps": 1}).data
    assert _png(base64.b64decode(item.b64_json)).shape == (64, 64, 3)
    r = httpx.post(f"{base_url}/v1/models/{BATCHED}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "style": "cinematic"}})
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == "input.style"
    assert "has no styles" in r.text
