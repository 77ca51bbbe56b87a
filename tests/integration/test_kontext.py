"""FLUX.1 Kontext on the running app: one instruction edit through every API (Replicate's
flux-kontext-dev inputs with the official client, `/generate`, OpenAI image edits) gives
the same pixels; the output takes the reference's shape; a mask repaints only its white
part; sizes over the limits are refused naming the field of the API that sent them."""

import base64
import io

import httpx
import numpy as np
from PIL import Image

from tests.integration.conftest import AUTH, FLUX, KONTEXT, decode, pixels
from tests.pictures import png_bytes

RNG = np.random.default_rng(12)
PHOTO = RNG.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 96 wide, 64 high: 3:2
OTHER = 255 - PHOTO
# The model's default area (96x96) in 3:2, each side down to a multiple of 16.
EDIT_SIZE = (112, 64)


def _data_uri(array) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(array)).decode()


def _generate(client, **body) -> np.ndarray:
    r = client.post("/generate", json={"prompt": "make the sky red", "model": KONTEXT,
                                       "seed": 5, **body})
    assert r.status_code == 200, r.text
    return pixels(decode(r.json()["image"]))


def test_one_edit_gives_the_same_pixels_through_every_api(rep, client, oai, base_url):
    edited = _generate(client, image=_data_uri(PHOTO))
    assert edited.shape == (EDIT_SIZE[1], EDIT_SIZE[0], 3)
    # As flux-kontext-dev's, the output is one file, not a list.
    png = rep.run("black-forest-labs/flux-kontext-dev", input={
        "prompt": "make the sky red", "input_image": io.BytesIO(png_bytes(PHOTO)), "seed": 5,
        "output_format": "png"})
    assert not isinstance(png, list)
    assert np.array_equal(pixels(Image.open(io.BytesIO(png.read()))), edited)
    resp = oai.images.edit(model=KONTEXT, image=("p.png", png_bytes(PHOTO), "image/png"),
                           prompt="make the sky red", extra_body={"seed": 5})
    assert resp.size == "112x64"
    assert np.array_equal(pixels(decode(resp.data[0].b64_json)), edited)
    # The reference is what was edited: another one, same prompt and seed, differs; no
    # image at all is text-to-image at the model's default size.
    assert not np.array_equal(_generate(client, image=_data_uri(OTHER)), edited)
    assert _generate(client).shape == (96, 96, 3)


def test_further_references_give_the_same_pixels_through_every_api(rep, client, oai):
    """A second and third reference: /generate's reference_images, Replicate's
    input_image_2 and _3 (flux-kontext-max's names), OpenAI's further image files."""
    tall = RNG.integers(0, 256, (120, 40, 3), dtype=np.uint8)
    sent = [_data_uri(tall), _data_uri(OTHER)]
    edited = _generate(client, image=_data_uri(PHOTO), reference_images=sent)
    assert edited.shape == (EDIT_SIZE[1], EDIT_SIZE[0], 3)
    assert not np.array_equal(edited, _generate(client, image=_data_uri(PHOTO)))
    png = rep.run("black-forest-labs/flux-kontext-dev", input={
        "prompt": "make the sky red", "input_image": _data_uri(PHOTO), "seed": 5,
        "input_image_2": io.BytesIO(png_bytes(tall)), "input_image_3": sent[1],
        "output_format": "png"})
    assert np.array_equal(pixels(Image.open(io.BytesIO(png.read()))), edited)
    # multi-image-kontext's names for the first two: input_image_1 and input_image_2.
    png = rep.run("black-forest-labs/flux-kontext-dev", input={
        "prompt": "make the sky red", "input_image_1": _data_uri(PHOTO), "seed": 5,
        "input_image_2": sent[0], "input_image_3": sent[1], "output_format": "png"})
    assert np.array_equal(pixels(Image.open(io.BytesIO(png.read()))), edited)
    resp = oai.images.edit(model=KONTEXT, image=[("p.png", png_bytes(PHOTO), "image/png"),
                                                 ("t.png", png_bytes(tall), "image/png"),
                                                 ("o.png", png_bytes(OTHER), "image/png")],
                           prompt="make the sky red", extra_body={"seed": 5})
    assert np.array_equal(pixels(decode(resp.data[0].b64_json)), edited)
    # Refused, naming each API's field: on a model that is not Kontext, past the limit of
    # 4 references, with a mask.
    r = client.post("/generate", json={"prompt": "x", "model": FLUX, "image": sent[0],
                                       "reference_images": sent})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body",
                                                                       "reference_images"]
    r = client.post("/generate", json={"prompt": "x", "model": KONTEXT, "image": sent[0],
                                       "reference_images": sent * 2})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body",
                                                                       "reference_images.3"]
    r = client.post("/v1/models/black-forest-labs/flux-kontext-dev/predictions", json={
        "input": {"prompt": "x", "input_image": sent[0], "input_image_3": "not an image"}},
        headers={"Prefer": "wait"})
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == (
        "input.input_image_3"), r.text
    r = client.post("/v1/models/black-forest-labs/flux-kontext-dev/predictions", json={
        "input": {"prompt": "x", "input_image": sent[0], "input_image_1": sent[0]}})
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == (
        "input.input_image_1"), r.text
    files = [("image", ("p.png", png_bytes(PHOTO), "image/png"))] * 2 + [
        ("mask", ("m.png", png_bytes(np.zeros((64, 96, 4), np.uint8)), "image/png"))]
    r = client.post("/v1/images/edits", data={"model": KONTEXT, "prompt": "x"}, files=files)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text
    assert "masked edit" in r.json()["error"]["message"]


def test_the_replicate_schema_is_flux_kontext_devs(base_url):
    version = httpx.get(f"{base_url}/v1/models/{KONTEXT}", headers=AUTH).json()
    schemas = version["latest_version"]["openapi_schema"]["components"]["schemas"]
    assert schemas["Output"] == {"type": "string", "format": "uri", "title": "Output"}
    schema = schemas["Input"]
    fields = set(schema["properties"])
    assert {"prompt", "input_image", "aspect_ratio", "guidance", "num_inference_steps",
            "lora_weights", "go_fast", "disable_safety_checker"} <= fields
    assert not {"image", "mask", "prompt_strength", "num_outputs"} & fields
    assert schema["properties"]["aspect_ratio"]["default"] == "match_input_image"


def test_replicate_aspect_ratios_crop_the_reference_and_over_the_limits_name_the_field(
        base_url):
    def create(**extra):
        return httpx.post(f"{base_url}/v1/models/{KONTEXT}/predictions",
                          headers={**AUTH, "Prefer": "wait"},
                          json={"input": {"prompt": "x", "input_image": _data_uri(PHOTO),
                                          **extra}})

    r = create(aspect_ratio="1:1")  # 1024x1024, over this model's 256x256 pixels
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.aspect_ratio"
    r = create(mask=_data_uri(PHOTO))
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == "input.mask"


def test_a_mask_repaints_only_its_white_part_on_generate(client):
    """OpenAI's masked edits on Kontext are in test_flux_and_edits, beside SDXL's and
    FLUX's; Replicate's flux-kontext-dev takes no mask (its 422 is above)."""
    mask = np.zeros((64, 96), np.uint8)
    mask[:, 56:] = 255
    out = _generate(client, image=_data_uri(PHOTO), mask=_data_uri(mask), width=96, height=64)
    diff = np.abs(out - PHOTO.astype(int))
    assert diff[:, :56].max() == 0 and diff[:, 56:].mean() > 20


def test_flux_without_kontext_still_does_img2img(client):
    r = client.post("/generate", json={"prompt": "x", "model": FLUX, "seed": 5,
                                       "image": _data_uri(PHOTO), "prompt_strength": 0})
    assert np.array_equal(pixels(decode(r.json()["image"])), PHOTO.astype(int))
