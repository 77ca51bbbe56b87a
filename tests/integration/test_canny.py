"""FLUX.1 Canny on the running app: one drawing through every API (Replicate's
flux-canny-dev inputs with the official client, `/generate`, OpenAI image edits) gives the
same pixels; the output follows the drawing's edges and size; what a Canny model lacks
or does not take is refused naming the field of the API that sent it."""

import base64
import io

import httpx
import numpy as np
from PIL import Image

from tests.integration.conftest import AUTH, CANNY, REDUX, decode, noise, pixels
from tests.pictures import png_bytes

DRAWING = np.full((64, 96, 3), 128, np.uint8)  # a yellow and a blue box on grey, 96x64
DRAWING[8:40, 8:48] = (250, 230, 60)
DRAWING[24:60, 56:90] = (20, 20, 200)


def _data_uri(array) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(array)).decode()


def _generate(client, **body):
    return client.post("/generate", json={"prompt": "two wooden crates", "model": CANNY,
                                          "seed": 5, **body})


def test_one_drawing_gives_the_same_pixels_through_every_api(rep, client, oai):
    r = _generate(client, image=_data_uri(DRAWING))
    assert r.status_code == 200, r.text
    drawn = pixels(decode(r.json()["image"]))
    assert drawn.shape == (64, 96, 3)
    out = rep.run("black-forest-labs/flux-canny-dev", input={
        "prompt": "two wooden crates", "control_image": io.BytesIO(png_bytes(DRAWING)),
        "megapixels": "match_input", "seed": 5, "output_format": "png"})
    assert isinstance(out, list) and len(out) == 1
    assert np.array_equal(pixels(Image.open(io.BytesIO(out[0].read()))), drawn)
    resp = oai.images.edit(model=CANNY, image=("d.png", png_bytes(DRAWING), "image/png"),
                           prompt="two wooden crates", extra_body={"seed": 5})
    assert resp.size == "96x64"
    assert np.array_equal(pixels(decode(resp.data[0].b64_json)), drawn)
    # Only the edges count: the same outlines in other colours draw the same image, and
    # other outlines another one.
    recoloured = DRAWING.copy()
    recoloured[8:40, 8:48] = (240, 240, 240)  # white and red boxes: the same edges
    recoloured[24:60, 56:90] = (200, 20, 20)
    r = _generate(client, image=_data_uri(recoloured))
    assert np.array_equal(pixels(decode(r.json()["image"])), drawn)
    r = _generate(client, image=_data_uri(np.roll(DRAWING, 30, axis=1)))
    assert np.abs(pixels(decode(r.json()["image"])) - drawn).mean() > 2


def test_thresholds_change_the_edges_the_same_way_on_each_api(rep, client):
    photo = np.asarray(noise(13, (96, 64)))  # gradients everywhere, of every strength
    fewer = {"canny_low_threshold": 150, "canny_high_threshold": 500}
    default, sparse = (pixels(decode(_generate(client, image=_data_uri(photo), **given).json()[
        "image"])) for given in ({}, fewer))
    assert np.abs(default - sparse).mean() > 1
    (out,) = rep.run("black-forest-labs/flux-canny-dev", input={
        "prompt": "two wooden crates", "control_image": io.BytesIO(png_bytes(photo)),
        "megapixels": "match_input", "seed": 5, "output_format": "png", **fewer})
    assert np.array_equal(pixels(Image.open(io.BytesIO(out.read()))), sparse)
    r = client.post("/generate", json={"prompt": "x", "model": REDUX,  # finds no edges
                                       "canny_high_threshold": 300})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == [
        "body", "canny_high_threshold"]
    r = _generate(client, image=_data_uri(photo), canny_low_threshold=300)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == [
        "body", "canny_low_threshold"]


def test_the_replicate_schema_is_flux_canny_devs(base_url):
    version = httpx.get(f"{base_url}/v1/models/{CANNY}", headers=AUTH).json()
    schemas = version["latest_version"]["openapi_schema"]["components"]["schemas"]
    assert schemas["Output"]["type"] == "array"
    schema = schemas["Input"]
    fields = set(schema["properties"])
    assert {"prompt", "control_image", "megapixels", "num_outputs", "guidance",
            "num_inference_steps", "lora_weights", "output_format"} <= fields
    assert not {"image", "mask", "prompt_strength", "aspect_ratio"} & fields
    assert set(schema["required"]) == {"prompt", "control_image"}


def test_what_a_canny_model_lacks_or_does_not_take_is_refused_naming_the_field(
        client, base_url):
    r = _generate(client)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"]
    r = _generate(client, image=_data_uri(DRAWING), mask=_data_uri(DRAWING))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "mask"]

    def create(**extra):
        return httpx.post(f"{base_url}/v1/models/{CANNY}/predictions",
                          headers={**AUTH, "Prefer": "wait"},
                          json={"input": {"prompt": "x", **extra}})

    r = create()
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == \
        "input.control_image"
    r = create(control_image=_data_uri(DRAWING))  # 1 MP: over this model's 256x256 pixels
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.megapixels"
    r = create(control_image="data:image/png;base64,bm90IGFuIGltYWdl",
               megapixels="match_input")
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == \
        "input.control_image"
    assert _generate(client, image=_data_uri(DRAWING)).status_code == 200
