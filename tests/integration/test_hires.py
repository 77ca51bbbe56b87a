"""The hires pass over HTTP: `/generate`, Replicate's SDXL input and OpenAI's `extra_body`
draw the same larger images, through the model's ESRGAN upscaler by default or bicubically
when asked; so do `/generate` and Replicate's flux-dev input on FLUX; an unknown upscaler
and a Kontext model are refused, naming the field."""

import base64
import io

import httpx
from PIL import Image

from tests.integration.conftest import AUTH, FAST, FLUX, KONTEXT, decode, pixels

SETTINGS = {"seed": 41, "guidance_scale": 6, "scheduler": "K_EULER", "width": 64,
            "height": 64, "hires_scale": 1.5, "hires_strength": 0.6}


def test_generate_and_replicate_draw_the_same_upscaled_redrawn_image(client, rep):
    r = client.post("/generate", json={"prompt": "a castle", "steps": 3} | SETTINGS)
    body = r.json()
    assert (body["width"], body["height"]) == (96, 96)
    drawn = decode(body["image"])
    assert drawn.size == (96, 96)
    (file,) = rep.run(FAST, input={"prompt": "a castle", "num_inference_steps": 3} | SETTINGS)
    assert (pixels(Image.open(io.BytesIO(file.read()))) == pixels(drawn)).all()
    plain = client.post("/generate", json={"prompt": "a castle", "steps": 3} | SETTINGS
                        | {"hires_scale": 1}).json()
    assert (plain["width"], plain["height"]) == (64, 64)


def test_flux_draws_the_same_hires_image_through_generate_and_replicate(client, rep, base_url):
    settings = {"seed": 5, "hires_scale": 1.5, "hires_strength": 0.6}
    r = client.post("/generate", json={"prompt": "a castle", "model": FLUX} | settings)
    assert r.status_code == 200, r.text
    drawn = decode(r.json()["image"])
    assert drawn.size == (96, 96)
    (file,) = rep.run("black-forest-labs/flux-dev", input={
        "prompt": "a castle", "output_format": "png"} | settings)
    assert (pixels(Image.open(io.BytesIO(file.read()))) == pixels(drawn)).all()
    plain = decode(client.post("/generate", json={"prompt": "a castle", "model": FLUX,
                                                  "seed": 5}).json()["image"])
    assert plain.size == (64, 64)
    schema = httpx.get(f"{base_url}/v1/models/{FLUX}", headers=AUTH).json()[
        "latest_version"]["openapi_schema"]["components"]["schemas"]["Input"]
    assert schema["properties"]["hires_upscaler"]["enum"] == ["bicubic"]


def test_a_hires_pass_on_kontext_or_past_the_limits_is_422_naming_the_field(base_url):
    r = httpx.post(f"{base_url}/generate", headers=AUTH,
                   json={"prompt": "x", "model": KONTEXT, "hires_scale": 1.5})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "hires_scale"
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "width": 256, "height": 256,
                                   "hires_scale": 2}})
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.hires_scale"
    assert "512x512" in r.text


def test_the_upscaler_is_the_models_first_unless_a_request_names_bicubic(client, rep, oai,
                                                                          base_url):
    body = {"prompt": "a castle", "steps": 3} | SETTINGS
    default = pixels(decode(client.post("/generate", json=body).json()["image"]))
    named = pixels(decode(client.post("/generate", json=body | {"hires_upscaler": "esrgan"})
                          .json()["image"]))
    bicubic = pixels(decode(client.post("/generate", json=body | {"hires_upscaler": "bicubic"})
                            .json()["image"]))
    assert (named == default).all() and abs(bicubic - default).mean() > 0.5
    (file,) = rep.run(FAST, input={"prompt": "a castle", "num_inference_steps": 3,
                                   "hires_upscaler": "bicubic"} | SETTINGS)
    assert (pixels(Image.open(io.BytesIO(file.read()))) == bicubic).all()
    extra = {k: v for k, v in SETTINGS.items() if k not in ("width", "height")}
    (item,) = oai.images.generate(model=FAST, prompt="a castle", size="64x64", extra_body={
        "num_inference_steps": 3, "hires_upscaler": "bicubic"} | extra).data
    drawn = Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB")
    assert drawn.size == (96, 96) and (pixels(drawn) == bicubic).all()
    r = client.post("/generate", json=body | {"hires_upscaler": "lanczos"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "hires_upscaler"
    assert "one of bicubic, esrgan" in r.json()["detail"][0]["msg"]
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "hires_scale": 1.5, "hires_upscaler": "x"}})
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.hires_upscaler"
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models[FAST]["upscalers"] == ["esrgan", "bicubic"]
    assert models[FLUX]["upscalers"] == ["bicubic"] and models[KONTEXT]["upscalers"] == []
    schema = httpx.get(f"{base_url}/v1/models/{FAST}", headers=AUTH).json()[
        "latest_version"]["openapi_schema"]["components"]["schemas"]["Input"]
    assert schema["properties"]["hires_upscaler"]["enum"] == ["esrgan", "bicubic"]
    assert schema["properties"]["hires_upscaler"]["default"] == "esrgan"
