"""An SDXL inpainting checkpoint (the tiny one, a 9-channel UNet) served through each API:
inpainting keeps the unmasked pixels, and text-to-image and img2img run as inpainting of
the whole image."""

import base64
import io

import numpy as np
from PIL import Image

from tests.integration.conftest import INPAINTING, decode, pixels, same_pixels
from tests.pictures import png_bytes

RNG = np.random.default_rng(21)
PHOTO = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
MASK = np.zeros((64, 64), np.uint8)
MASK[:, 24:] = 255


def _b64(picture) -> str:
    return base64.b64encode(png_bytes(picture)).decode()


def test_the_model_is_listed_as_an_inpainting_one(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models[INPAINTING]["inpainting"] is True
    assert models["atelier/tiny-sdxl"]["inpainting"] is False


def test_replicate_inpainting_keeps_the_unmasked_pixels_and_repaints_the_rest(rep):
    (painted,) = rep.run("diffusers/stable-diffusion-xl-1.0-inpainting-0.1", input={
        "prompt": "a red chair", "image": _b64(PHOTO), "mask": _b64(MASK), "seed": 4,
        "num_inference_steps": 4, "prompt_strength": 1})
    diff = np.abs(pixels(Image.open(io.BytesIO(painted.read()))) - PHOTO.astype(int))
    assert diff[:, :24].max() == 0 and diff[:, 24:].mean() > 20


def test_text_to_image_is_the_inpainting_of_a_blank_image_whole(client):
    body = {"model": INPAINTING, "prompt": "a lighthouse", "seed": 6, "steps": 3}
    drawn = client.post("/generate", json=body)
    assert drawn.status_code == 200, drawn.text
    assert drawn.headers["x-atelier-batch-size"] == "1"
    blank = client.post("/generate", json=body | {
        "image": _b64(np.zeros((64, 64, 3), np.uint8)),
        "mask": _b64(np.full((64, 64), 255, np.uint8)), "prompt_strength": 1}).json()
    image = drawn.json()["image"]
    assert decode(image).size == (64, 64) and same_pixels(image, blank["image"])
    other = client.post("/generate", json=body | {"seed": 7}).json()["image"]
    assert np.abs(pixels(decode(image)) - pixels(decode(other))).mean() > 5


def test_an_openai_edit_without_a_mask_repaints_the_whole_image_at_its_strength(oai):
    kept = oai.images.edit(model=INPAINTING, image=("p.png", png_bytes(PHOTO), "image/png"),
                           prompt="x", extra_body={"prompt_strength": 0, "seed": 3})
    assert (pixels(decode(kept.data[0].b64_json)) == PHOTO).all()
    moved = oai.images.edit(model=INPAINTING, image=("p.png", png_bytes(PHOTO), "image/png"),
                            prompt="x", extra_body={"prompt_strength": 0.7, "seed": 3})
    assert np.abs(pixels(decode(moved.data[0].b64_json)) - PHOTO).mean() > 5


def test_outpainting_draws_the_border_of_a_larger_canvas_and_keeps_the_picture(client):
    r = client.post("/generate", json={"model": INPAINTING, "prompt": "a wide beach",
                                       "image": _b64(PHOTO[:, :32]), "seed": 2, "steps": 3,
                                       "outpaint": {"right": 32}})
    assert r.status_code == 200, r.text
    out = pixels(decode(r.json()["image"]))
    assert out.shape == (64, 64, 3) and (out[:, :32] == PHOTO[:, :32]).all()
    assert np.abs(out[:, 32:] - 255).mean() > 20  # the white canvas is drawn over
    plain = client.post("/generate", json={"prompt": "x", "image": _b64(PHOTO),
                                           "outpaint": {"right": 32}})
    assert plain.status_code == 422 and plain.json()["detail"][0]["loc"][-1] == "outpaint"
