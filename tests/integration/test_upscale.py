"""Enlarging the finished images over HTTP (`upscale`, `upscaler`): `/generate`, Replicate's
SDXL input and OpenAI's `extra_body` answer the same enlarged images at the larger size;
an input image at prompt strength 0 comes back enlarged itself, as Replicate's
real-esrgan (an upscaling alias of the model) answers it; refusals name the field."""

import base64
import io

import httpx
import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from tests.integration.conftest import AUTH, FAST, FLUX, KONTEXT, decode, pixels

PROMPT = {"prompt": "a castle", "seed": 12, "width": 64, "height": 64, "upscale": 2}


def _png_uri(array) -> str:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_every_api_answers_the_same_enlarged_images(client, rep, oai):
    r = client.post("/generate", json=PROMPT | {"steps": 3})
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (128, 128)
    drawn = pixels(decode(r.json()["image"]))  # through FAST's first upscaler, its ESRGAN
    assert drawn.shape == (128, 128, 3)
    (file,) = rep.run(FAST, input=PROMPT | {"num_inference_steps": 3})
    assert (pixels(Image.open(io.BytesIO(file.read()))) == drawn).all()
    extra = {"seed": 12, "num_inference_steps": 3, "upscale": 2}
    result = oai.images.generate(model=FAST, prompt="a castle", size="64x64", extra_body=extra)
    assert result.size == "128x128"
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB")
    assert (pixels(image) == drawn).all()
    bicubic = client.post("/generate", json=PROMPT | {"steps": 3, "upscaler": "bicubic"})
    assert np.abs(pixels(decode(bicubic.json()["image"])) - drawn).mean() > 0.5


def test_an_image_at_strength_0_comes_back_enlarged(client, rep):
    photo = np.random.default_rng(4).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    body = {"prompt": "x", "image": _png_uri(photo), "prompt_strength": 0, "upscale": 2,
            "upscaler": "bicubic"}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    grown = F.interpolate(torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255,
                          size=(128, 160), mode="bicubic").clamp(0, 1)
    expected = (grown[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    answered = pixels(decode(r.json()["image"]))
    assert (answered == expected.numpy()).all()
    (file,) = rep.run(FAST, input=body)
    assert (pixels(Image.open(io.BytesIO(file.read()))) == answered).all()


def test_real_esrgans_client_code_runs_unchanged_against_the_upscaling_alias(client, rep):
    """replicate.run("nightmareai/real-esrgan", ...) as on Replicate: one file, the image
    enlarged by FAST's first upscaler, as `/generate` answers it at strength 0."""
    photo = np.random.default_rng(5).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "PNG")
    output = rep.run("nightmareai/real-esrgan", input={"image": io.BytesIO(buffer.getvalue()),
                                                       "scale": 2})
    enlarged = pixels(Image.open(io.BytesIO(output.read())))  # one file, not a list
    assert enlarged.shape == (128, 160, 3)
    halved = rep.run("nightmareai/real-esrgan", input={"image": io.BytesIO(buffer.getvalue()),
                                                       "scale": 0.5})
    assert pixels(Image.open(io.BytesIO(halved.read()))).shape == (32, 40, 3)
    r = client.post("/generate", json={"prompt": "x", "image": _png_uri(photo),
                                       "prompt_strength": 0, "upscale": 2})
    assert (pixels(decode(r.json()["image"])) == enlarged).all()
    model = rep.models.get("nightmareai/real-esrgan")
    schema = model.latest_version.openapi_schema["components"]["schemas"]
    assert set(schema["Input"]["properties"]) == {"image", "scale", "face_enhance"}
    assert schema["Output"]["type"] == "string"
    version = model.latest_version.id  # its own, so a prediction naming it alone runs here
    assert version != rep.models.get(FAST).latest_version.id
    made = rep.predictions.create(version=version, input={  # the version alone names it
        "image": io.BytesIO(buffer.getvalue()), "scale": 2})
    made.wait()
    assert (made.status, made.model) == ("succeeded", "nightmareai/real-esrgan")
    pinned = client.get(made.output)  # one URL
    assert (pixels(Image.open(io.BytesIO(pinned.content))) == enlarged).all()
    r = client.post("/v1/models/nightmareai/real-esrgan/predictions",
                    json={"input": {"image": _png_uri(photo), "face_enhance": True}})
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.face_enhance"


def test_what_cannot_be_enlarged_is_refused_naming_the_field(client, base_url):
    r = client.post("/generate", json={"prompt": "x", "model": KONTEXT, "upscale": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "upscale"
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "upscale": 2, "upscaler": "lanczos"}})
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.upscaler"
    r = client.post("/generate", json={"prompt": "x", "upscale": 5})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "upscale"
    schema = client.get(f"/v1/models/{FAST}").json()[
        "latest_version"]["openapi_schema"]["components"]["schemas"]["Input"]
    assert schema["properties"]["upscaler"]["enum"] == ["esrgan", "bicubic"]
    flux = client.get(f"/v1/models/{FLUX}").json()[
        "latest_version"]["openapi_schema"]["components"]["schemas"]["Input"]
    assert flux["properties"]["upscaler"]["enum"] == ["bicubic"]
