"""FLUX.1 Fill on the running app: one fill through every API (Replicate's flux-fill-dev
inputs with the official client, `/generate` with a mask or an image with a transparent
hole, OpenAI image edits with an OpenAI-style mask) gives the same pixels, the unmasked
ones the input's own; a transparent border is outpainted; what a fill lacks is refused
naming the field of the API that sent it."""

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.integration.conftest import AUTH, FILL, decode, pixels
from tests.pictures import png_bytes

RNG = np.random.default_rng(15)
PHOTO = RNG.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 96 wide, 64 high
HOLE = np.zeros((64, 96), np.uint8)
HOLE[16:48, 32:80] = 255  # white: drawn anew


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _holed(photo=PHOTO, hole=HOLE) -> bytes:
    """The photo with the hole transparent, as OpenAI's masks and flux-fill-dev's alpha
    masks are made."""
    return png_bytes(np.dstack([photo, 255 - hole]), "RGBA")


def _generate(client, **body):
    return client.post("/generate", json={"prompt": "a red vase", "model": FILL, "seed": 5,
                                          **body})


def test_one_fill_gives_the_same_pixels_through_every_api(rep, client, oai):
    r = _generate(client, image=_data_uri(png_bytes(PHOTO)), mask=_data_uri(png_bytes(HOLE)))
    assert r.status_code == 200, r.text
    filled = pixels(decode(r.json()["image"]))
    white = HOLE == 255
    assert filled.shape == (64, 96, 3) and np.array_equal(filled[~white], PHOTO[~white])
    assert np.abs(filled - PHOTO.astype(int))[white].mean() > 20
    # The image's transparent hole and no mask: the same fill (the hole's pixels are
    # not read, whatever they are).
    r = _generate(client, image=_data_uri(_holed()))
    assert np.array_equal(pixels(decode(r.json()["image"])), filled)
    out = rep.run("black-forest-labs/flux-fill-dev", input={
        "prompt": "a red vase", "image": io.BytesIO(png_bytes(PHOTO)),
        "mask": io.BytesIO(png_bytes(HOLE)), "megapixels": "match_input", "seed": 5,
        "output_format": "png"})
    assert isinstance(out, list) and len(out) == 1  # as flux-fill-dev's: a list
    assert np.array_equal(pixels(Image.open(io.BytesIO(out[0].read()))), filled)
    resp = oai.images.edit(model=FILL, image=("p.png", png_bytes(PHOTO), "image/png"),
                           mask=("m.png", _holed(), "image/png"), prompt="a red vase",
                           extra_body={"seed": 5})
    assert resp.size == "96x64"
    assert np.array_equal(pixels(decode(resp.data[0].b64_json)), filled)
    # Another prompt or seed fills the same hole otherwise (the tiny random model's text
    # encoders move it less than its noise does).
    for change in ({"prompt": "a window"}, {"seed": 6}):
        r = _generate(client, image=_data_uri(_holed()), **change)
        other = pixels(decode(r.json()["image"]))
        assert np.array_equal(other[~white], PHOTO[~white])
        assert np.abs(other - filled)[white].mean() > (0.5 if "prompt" in change else 5)


def test_a_transparent_border_is_outpainted_and_the_picture_kept(client):
    canvas = np.zeros((64, 128, 4), np.uint8)  # a 64x64 picture in the middle of 128 wide
    canvas[:, 32:96, :3] = PHOTO[:, :64]
    canvas[:, 32:96, 3] = 255
    r = _generate(client, image=_data_uri(png_bytes(canvas, "RGBA")), prompt="a wide beach")
    assert r.status_code == 200, r.text
    out = pixels(decode(r.json()["image"]))
    assert out.shape == (64, 128, 3)
    assert np.array_equal(out[:, 32:96], PHOTO[:, :64].astype(int))
    assert np.abs(out[:, :32] - 255).mean() > 20 and np.abs(out[:, 96:] - 255).mean() > 20
    # `outpaint` makes that canvas here: the same pixels, by the side or by the preset.
    picture = _data_uri(png_bytes(PHOTO[:, :64]))
    by_sides = _generate(client, image=picture, prompt="a wide beach",
                         outpaint={"left": 32, "right": 32})
    assert np.array_equal(pixels(decode(by_sides.json()["image"])), out)
    half = _data_uri(png_bytes(PHOTO[16:48, 32:64]))  # 32x32: 2x is 64x64
    zoomed = pixels(decode(_generate(client, image=half, outpaint="Zoom out 2x").json()[
        "image"]))
    assert zoomed.shape == (64, 64, 3)
    assert np.array_equal(zoomed[16:48, 16:48], PHOTO[16:48, 32:64].astype(int))


def test_replicate_takes_flux_fill_pros_outpaint_presets(rep, client):
    half = png_bytes(PHOTO[16:48, 32:64])
    (file,) = rep.run("black-forest-labs/flux-fill-dev", input={
        "prompt": "a red vase", "image": io.BytesIO(half), "outpaint": "Zoom out 2x",
        "megapixels": "match_input", "seed": 5, "output_format": "png"})
    direct = _generate(client, image=_data_uri(half), outpaint="Zoom out 2x")
    assert np.array_equal(pixels(Image.open(io.BytesIO(file.read()))),
                          pixels(decode(direct.json()["image"])))


def test_the_replicate_schema_is_flux_fill_devs(base_url):
    version = httpx.get(f"{base_url}/v1/models/{FILL}", headers=AUTH).json()
    schemas = version["latest_version"]["openapi_schema"]["components"]["schemas"]
    assert schemas["Output"]["type"] == "array"
    schema = schemas["Input"]
    fields = set(schema["properties"])
    assert {"prompt", "image", "mask", "megapixels", "num_outputs", "guidance",
            "num_inference_steps", "lora_weights", "output_format"} <= fields
    assert not {"prompt_strength", "aspect_ratio", "input_image"} & fields
    assert set(schema["required"]) == {"prompt", "image"}
    assert schema["properties"]["megapixels"]["default"] == "1"


def test_what_a_fill_lacks_is_refused_naming_the_field(client, base_url, oai):
    r = _generate(client)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"]
    assert "send an image and a mask" in r.json()["detail"][0]["msg"]
    r = _generate(client, image=_data_uri(png_bytes(PHOTO)))  # opaque, no mask: nothing to fill
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "mask"]
    for outpaint, model in (("Zoom out 3x", FILL), ({"left": -1}, FILL),
                            ({"left": 8}, "atelier/tiny-flux")):
        r = _generate(client, image=_data_uri(png_bytes(PHOTO)), outpaint=outpaint,
                      model=model)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == [
            "body", "outpaint"], r.text

    def create(**extra):
        return httpx.post(f"{base_url}/v1/models/{FILL}/predictions",
                          headers={**AUTH, "Prefer": "wait"},
                          json={"input": {"prompt": "x", **extra}})

    r = create(mask=_data_uri(png_bytes(HOLE)))
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == "input.image"
    r = create(image=_data_uri(png_bytes(PHOTO)))
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == "input.mask"
    r = create(image=_data_uri(png_bytes(PHOTO)), outpaint="Zoom out 3x")
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == "input.outpaint"
    # One megapixel at the image's 3:2 is over this model's 256x256 pixels.
    r = create(image=_data_uri(_holed()))
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.megapixels"
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(model=FILL, prompt="a vase")
    assert err.value.body["param"] == "image"
    # The model keeps serving.
    assert _generate(client, image=_data_uri(_holed())).status_code == 200
