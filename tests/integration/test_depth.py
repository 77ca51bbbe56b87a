"""FLUX.1 Depth on the running app: one picture through every API (Replicate's
flux-depth-dev inputs with the official client, `/generate`, OpenAI image edits) gives the
same pixels; the output follows the picture's depth and size; what a Depth model lacks or
does not take is refused naming the field of the API that sent it."""

import base64
import io

import numpy as np
from PIL import Image

from tests.integration.conftest import AUTH, DEPTH, decode, noise, pixels
from tests.pictures import png_bytes, scene

SCENE = png_bytes(scene())
SCENE_URI = "data:image/png;base64," + base64.b64encode(SCENE).decode()


def _generate(client, **body):
    return client.post("/generate", json={"prompt": "a quiet room", "model": DEPTH, "seed": 5,
                                          **body})


def test_one_picture_gives_the_same_pixels_through_every_api(rep, client, oai):
    r = _generate(client, image=SCENE_URI)
    assert r.status_code == 200, r.text
    drawn = pixels(decode(r.json()["image"]))
    assert drawn.shape == (64, 96, 3)
    (out,) = rep.run("black-forest-labs/flux-depth-dev", input={
        "prompt": "a quiet room", "control_image": io.BytesIO(SCENE),
        "megapixels": "match_input", "seed": 5, "output_format": "png"})
    assert np.array_equal(pixels(Image.open(io.BytesIO(out.read()))), drawn)
    resp = oai.images.edit(model=DEPTH, image=("s.png", SCENE, "image/png"),
                           prompt="a quiet room", extra_body={"seed": 5})
    assert resp.size == "96x64"
    assert np.array_equal(pixels(decode(resp.data[0].b64_json)), drawn)
    # Another layout, same prompt and seed: another image.
    flipped = "data:image/png;base64," + base64.b64encode(png_bytes(scene(flip=True))).decode()
    other = pixels(decode(_generate(client, image=flipped).json()["image"]))
    assert np.abs(other - drawn).mean() > 1


def test_what_a_depth_model_lacks_or_does_not_take_is_refused(client, base_url):
    import httpx

    cases = [({}, "image", "depth of a control image"),
             ({"image": SCENE_URI, "mask": SCENE_URI}, "mask", "takes no mask"),
             ({"image": SCENE_URI, "canny_low_threshold": 10}, "canny_low_threshold",
              "finds no edges")]
    for body, field, says in cases:
        r = _generate(client, **body)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", field] and says in detail["msg"]
    r = httpx.post(f"{base_url}/v1/models/{DEPTH}/predictions",
                   headers={**AUTH, "Prefer": "wait"}, json={"input": {"prompt": "x"}})
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.control_image"


def test_a_redux_picture_brings_its_look_to_the_depth_layout_on_every_api(rep, client, oai):
    style = "data:image/png;base64," + base64.b64encode(png_bytes(noise(41, (48, 40)))).decode()
    r = _generate(client, image=SCENE_URI, redux_image=style)
    assert r.status_code == 200, r.text
    styled = pixels(decode(r.json()["image"]))
    plain = pixels(decode(_generate(client, image=SCENE_URI).json()["image"]))
    assert np.abs(styled - plain).max() >= 4
    (out,) = rep.run("black-forest-labs/flux-depth-dev", input={
        "prompt": "a quiet room", "control_image": SCENE_URI, "redux_image": style,
        "megapixels": "match_input", "seed": 5, "output_format": "png"})
    assert np.array_equal(pixels(Image.open(io.BytesIO(out.read()))), styled)
    resp = oai.images.edit(model=DEPTH, image=("s.png", SCENE, "image/png"),
                           prompt="a quiet room", extra_body={"seed": 5, "redux_image": style})
    assert np.array_equal(pixels(decode(resp.data[0].b64_json)), styled)
