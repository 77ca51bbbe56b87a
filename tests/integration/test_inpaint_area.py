"""Inpainting only the masked area over HTTP: a photo larger than the model draws, its small
masked area drawn at the model's size and laid back, the same through `/generate`,
Replicate's SDXL input and OpenAI's edits; FLUX too; refusals name the field."""

import base64
import io

import httpx
import numpy as np
from PIL import Image

from tests.integration.conftest import AUTH, FAST, FILL, FLUX, decode, pixels
from tests.pictures import png_bytes

RNG = np.random.default_rng(9)
PHOTO = RNG.integers(0, 256, (300, 400, 3), dtype=np.uint8)  # 120,000 pixels: over 256²
MASK = np.zeros((300, 400), np.uint8)
MASK[140:170, 200:240] = 255


def _uri(array) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(array)).decode()


def _laid_back(image: np.ndarray) -> None:
    """The photo's own pixels outside the mask, new ones inside it."""
    assert image.shape == PHOTO.shape
    diff = np.abs(image - PHOTO.astype(int))
    assert diff[MASK == 0].max() == 0 and diff[MASK == 255].mean() > 5


def test_every_api_draws_the_masked_area_and_lays_it_into_the_photo(client, rep, oai):
    """The photo is large enough for the invisible watermark, which every API puts on the
    whole image: the pixels outside the mask are compared unmarked."""
    body = {"prompt": "a red flower", "steps": 4, "seed": 21, "image": _uri(PHOTO),
            "mask": _uri(MASK), "padding_mask_crop": 16}
    r = client.post("/generate", json=body | {"apply_watermark": False})
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (400, 300)
    _laid_back(pixels(decode(r.json()["image"])))
    drawn = pixels(decode(client.post("/generate", json=body).json()["image"]))
    assert drawn.shape == PHOTO.shape
    whole = client.post("/generate", json=body | {"padding_mask_crop": None})  # over limits
    assert whole.status_code == 422 and whole.json()["detail"][0]["loc"][-1] == "width"
    (file,) = rep.run(FAST, input={"prompt": "a red flower", "num_inference_steps": 4,
                                   "seed": 21, "image": _uri(PHOTO), "mask": _uri(MASK),
                                   "padding_mask_crop": 16})
    assert (pixels(Image.open(io.BytesIO(file.read()))) == drawn).all()
    (item,) = oai.images.edit(model=FAST, prompt="a red flower",
                              image=("p.png", png_bytes(PHOTO), "image/png"),
                              mask=("m.png", png_bytes(MASK), "image/png"),
                              extra_body={"padding_mask_crop": 16, "seed": 21,
                                          "num_inference_steps": 4}).data
    edited = pixels(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB"))
    assert (edited == drawn).all()


def test_flux_draws_the_masked_area_at_its_default_size(client, rep):
    body = {"prompt": "a red flower", "model": FLUX, "steps": 3, "seed": 4,
            "image": _uri(PHOTO), "mask": _uri(MASK), "padding_mask_crop": 16}
    r = client.post("/generate", json=body | {"apply_watermark": False})
    assert r.status_code == 200, r.text
    _laid_back(pixels(decode(r.json()["image"])))
    marked = pixels(decode(client.post("/generate", json=body).json()["image"]))
    (file,) = rep.run(FLUX, input={"prompt": "a red flower", "num_inference_steps": 3,
                                   "seed": 4, "image": _uri(PHOTO), "mask": _uri(MASK),
                                   "padding_mask_crop": 16, "output_format": "png"})
    assert (pixels(Image.open(io.BytesIO(file.read()))) == marked).all()


def test_flux_fill_draws_the_masked_area_at_megapixels_of_its_shape(client, rep):
    """flux-fill-dev's `match_input`: the region around the mask (104x94: 40x30 and 32
    more each side) at its own area, each side a multiple of 16: 96x80, as /generate draws
    it given that size; a quarter megapixel at its shape is over the model's limits."""
    fill = {"prompt": "a red vase", "seed": 5, "image": _uri(PHOTO), "mask": _uri(MASK),
            "padding_mask_crop": 32}
    (file,) = rep.run("black-forest-labs/flux-fill-dev", input=fill | {
        "megapixels": "match_input", "output_format": "png"})
    drawn = pixels(Image.open(io.BytesIO(file.read())))
    r = client.post("/generate", json=fill | {"model": FILL, "width": 96, "height": 80})
    assert r.status_code == 200, r.text
    assert (pixels(decode(r.json()["image"])) == drawn).all()
    r = client.post("/generate", json=fill | {"model": FILL, "width": 96, "height": 80,
                                              "apply_watermark": False})
    _laid_back(pixels(decode(r.json()["image"])))
    r = client.post("/v1/models/black-forest-labs/flux-fill-dev/predictions",
                    json={"input": fill | {"megapixels": "0.25"}})
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.megapixels"


def test_without_a_mask_or_with_nothing_masked_it_is_refused_naming_the_field(base_url):
    body = {"prompt": "x", "image": _uri(PHOTO), "padding_mask_crop": 16}
    r = httpx.post(f"{base_url}/generate", headers=AUTH, json=body)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] == "padding_mask_crop"
    r = httpx.post(f"{base_url}/generate", headers=AUTH,
                   json=body | {"mask": _uri(np.zeros((300, 400), np.uint8))})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "mask"
