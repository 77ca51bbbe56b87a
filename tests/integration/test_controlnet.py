"""ControlNet through `/generate` on the running app: the control image steers the image,
the canny ControlNet draws from a picture's edges, the ControlNet's own scale is the
default, and bad ControlNet fields are 422s naming them."""

import base64
import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.integration.conftest import FAST, FLUX, assert_same_pixels, decode, pixels


def _picture() -> Image.Image:
    """96x64: a bright square and a dark disc on a mid-grey ground."""
    image = Image.new("RGB", (96, 64), (120, 120, 120))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 40, 40), fill=(240, 230, 220))
    draw.ellipse((55, 15, 85, 45), fill=(20, 30, 40))
    return image


PICTURE = _picture()
EDGES = Image.fromarray(cv2.Canny(np.asarray(PICTURE.convert("L")), 100, 200)).convert("RGB")


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _generate(client, **fields):
    body = {"model": FAST, "prompt": "a product shot", "steps": 4, "seed": 21, **fields}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_control_image_steers_the_image_and_sets_its_size(client):
    plain = _generate(client, width=96, height=64)
    off = _generate(client, control_image=_b64(PICTURE), controlnet_conditioning_scale=0)
    on = _generate(client, control_image=_b64(PICTURE))
    assert (on["width"], on["height"]) == (96, 64) == decode(on["image"]).size
    assert_same_pixels(decode(off["image"]), decode(plain["image"]))
    assert np.abs(pixels(decode(on["image"])) - pixels(decode(plain["image"]))).mean() > 3
    sized = _generate(client, control_image=_b64(PICTURE), width=64, height=64)
    assert decode(sized["image"]).size == (64, 64)


def test_the_canny_controlnet_draws_from_the_pictures_edges(client):
    # "canny" and "lines" have the same weights; only canny preprocesses its input.
    from_picture = _generate(client, control_image=_b64(PICTURE), controlnet="canny",
                             controlnet_conditioning_scale=1.0)
    from_edges = _generate(client, control_image=_b64(EDGES), controlnet="lines",
                           controlnet_conditioning_scale=1.0)
    assert_same_pixels(decode(from_picture["image"]), decode(from_edges["image"]))
    unprocessed = _generate(client, control_image=_b64(PICTURE), controlnet="lines",
                            controlnet_conditioning_scale=1.0)
    assert np.abs(pixels(decode(unprocessed["image"]))
                  - pixels(decode(from_edges["image"]))).mean() > 0.5


def test_the_controlnets_own_scale_is_the_default(client):
    default = _generate(client, control_image=_b64(EDGES), controlnet="lines")
    half = _generate(client, control_image=_b64(EDGES), controlnet="lines",
                     controlnet_conditioning_scale=0.5)
    full = _generate(client, control_image=_b64(EDGES), controlnet="lines",
                     controlnet_conditioning_scale=1.0)
    assert_same_pixels(decode(default["image"]), decode(half["image"]))
    assert np.abs(pixels(decode(default["image"])) - pixels(decode(full["image"]))).mean() > 1


def test_the_model_list_names_the_controlnets(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models[FAST]["controlnets"] == {
        "canny": {"conditioning_scale": 1.0, "preprocess": "canny"},
        "lines": {"conditioning_scale": 0.5, "preprocess": "none"}}
    assert models[FLUX]["controlnets"] == {}


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"controlnet": "depth"}, "controlnet", "canny, lines"),
    ({"model": FLUX}, "control_image", "no ControlNet"),
    ({"control_image": "bm90IGFuIGltYWdl"}, "control_image", "cannot be decoded"),
    ({"image": _b64(PICTURE)}, "control_image", "text-to-image alone"),
    ({"control_guidance_start": 0.6, "control_guidance_end": 0.4}, "control_guidance_start",
     "below control_guidance_end"),
    ({"controlnet_conditioning_scale": 3}, "controlnet_conditioning_scale", "2"),
    ({"control_image": None, "controlnet": "canny"}, "control_image", "needs"),
])
def test_bad_controlnet_fields_are_422s_naming_them(client, fields, field, words):
    body = {"model": FAST, "prompt": "x", "steps": 2, "control_image": _b64(PICTURE), **fields}
    if body["control_image"] is None:
        del body["control_image"]
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", field] and words in error["msg"], error
