"""Seed variations over HTTP: `/generate` and Replicate's SDXL and FLUX inputs draw the same
variation; strength 0 is the seed's image; a FLUX.1 Kontext model draws them in
text-to-image and refuses them for an edit, naming the field."""

import base64
import io

import httpx
from PIL import Image

from tests.integration.conftest import (
    AUTH,
    FAST,
    FLUX,
    KONTEXT,
    decode,
    noise,
    pixels,
)
from tests.pictures import png_bytes

BODY = {"prompt": "a lighthouse", "steps": 3, "seed": 12, "guidance_scale": 6,
        "scheduler": "K_EULER_ANCESTRAL", "width": 64, "height": 64}


def _drawn(client, **changes):
    r = client.post("/generate", json=BODY | changes)
    assert r.status_code == 200, r.text
    return pixels(decode(r.json()["image"]))


def test_a_variation_through_generate_replicate_and_openai(client, rep, oai):
    varied = _drawn(client, variation_seed=99, variation_strength=0.3)
    own = _drawn(client)
    assert (_drawn(client, variation_seed=99, variation_strength=0) == own).all()
    assert abs(varied - own).mean() > 0.5
    (file,) = rep.run(FAST, input={"prompt": BODY["prompt"], "num_inference_steps": 3,
                                   "seed": 12, "guidance_scale": 6,
                                   "scheduler": "K_EULER_ANCESTRAL", "width": 64,
                                   "height": 64, "variation_seed": 99,
                                   "variation_strength": 0.3})
    assert (pixels(Image.open(io.BytesIO(file.read()))) == varied).all()
    (item,) = oai.images.generate(model=FAST, prompt=BODY["prompt"], size="64x64", extra_body={
        "num_inference_steps": 3, "seed": 12, "guidance_scale": 6,
        "scheduler": "K_EULER_ANCESTRAL", "variation_seed": 99,
        "variation_strength": 0.3}).data
    drawn = Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB")
    assert (pixels(drawn) == varied).all()


def test_a_flux_variation_through_generate_and_replicate(client, rep):
    """The model's default size and scheduler on both APIs."""
    flux = {"prompt": "a lighthouse", "model": FLUX, "steps": 3, "seed": 12}

    def drawn(**changes):
        r = client.post("/generate", json=flux | changes)
        assert r.status_code == 200, r.text
        return pixels(decode(r.json()["image"]))

    own = drawn()
    varied = drawn(variation_seed=99, variation_strength=0.3)
    assert (drawn(variation_seed=99, variation_strength=0) == own).all()
    assert varied.shape == own.shape and abs(varied - own).mean() > 0.5
    (file,) = rep.run(FLUX, input={"prompt": "a lighthouse", "num_inference_steps": 3,
                                   "seed": 12, "output_format": "png",
                                   "variation_seed": 99, "variation_strength": 0.3})
    assert (pixels(Image.open(io.BytesIO(file.read()))) == varied).all()


def test_a_kontext_edit_and_a_missing_variation_seed_are_422_naming_the_field(base_url):
    """Kontext draws variations of its text-to-image images only, not of edits."""
    image = "data:image/png;base64," + base64.b64encode(png_bytes(noise(1, (96, 96)))).decode()
    r = httpx.post(f"{base_url}/generate", headers=AUTH, json={
        "prompt": "x", "model": KONTEXT, "variation_seed": 1, "variation_strength": 0.5,
        "image": image})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] == "variation_strength"
    r = httpx.post(f"{base_url}/generate", headers=AUTH, json={
        "prompt": "x", "model": KONTEXT, "variation_seed": 1, "variation_strength": 0.5,
        "steps": 2})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{base_url}/generate", headers=AUTH,
                   json={"prompt": "x", "variation_strength": 0.5, "width": 64, "height": 64})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "variation_seed"


def test_a_kontext_variation_through_replicate_is_generates_and_edits_refuse_it(
        client, base_url):
    """flux-kontext-dev's input, text-to-image (no input_image): the image /generate draws
    for the same seeds; with an input_image, a 422 naming the Replicate field."""
    body = {"prompt": "a lighthouse", "model": KONTEXT, "steps": 2, "seed": 12,
            "variation_seed": 99, "variation_strength": 0.4}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    varied = pixels(decode(r.json()["image"]))
    own = pixels(decode(client.post("/generate", json=body | {"variation_strength": 0})
                        .json()["image"]))
    assert abs(varied - own).mean() > 0.5
    given = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 12,
             "output_format": "png", "variation_seed": 99, "variation_strength": 0.4}
    r = httpx.post(f"{base_url}/v1/models/{KONTEXT}/predictions",
                   headers={**AUTH, "Prefer": "wait"}, json={"input": given})
    assert r.status_code == 201, r.text
    url = r.json()["output"]
    data = base64.b64decode(url.split(",", 1)[1])
    assert (pixels(Image.open(io.BytesIO(data))) == varied).all()
    image = "data:image/png;base64," + base64.b64encode(png_bytes(noise(1, (96, 96)))).decode()
    r = httpx.post(f"{base_url}/v1/models/{KONTEXT}/predictions",
                   headers={**AUTH, "Prefer": "wait"},
                   json={"input": given | {"input_image": image}})
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.variation_strength"
