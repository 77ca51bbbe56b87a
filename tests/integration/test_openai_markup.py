"""OpenAI's edit markup, through the official client: a transparent PNG whose strokes, laid
over the image, guide the edit, which redraws the marked-up picture."""

import base64

import httpx
import openai
import pytest
from PIL import Image

from tests.integration.conftest import (
    AUTH,
    FAST,
    assert_same_pixels,
    decode,
    noise,
    pixels,
)
from tests.pictures import png_bytes

PHOTO = noise(4, (64, 64))
SQUARE, BLUE = (16, 16, 48, 40), (20, 40, 230)


def _markup(size=(64, 64), ground=0) -> bytes:
    """A blue rectangle on a transparent ground (`ground`: the ground's alpha)."""
    marks = Image.new("RGBA", size, (0, 0, 0, ground))
    marks.paste((*BLUE, 255), SQUARE)
    return png_bytes(marks)


def _edit(oai, **files):
    (item,) = oai.images.edit(model=FAST, prompt="a blue box", extra_body={
        "seed": 8, "num_inference_steps": 3, "prompt_strength": 0.6},
        image=("p.png", png_bytes(PHOTO), "image/png"), **files).data
    return decode(item.b64_json)


def test_the_edit_redraws_the_image_with_the_markup_laid_over_it(oai, client):
    marked = _edit(oai, markup=("m.png", _markup(), "image/png"))
    laid = PHOTO.copy()
    laid.paste(BLUE, SQUARE)
    direct = client.post("/generate", json={
        "prompt": "a blue box", "seed": 8, "steps": 3, "prompt_strength": 0.6,
        "image": "data:image/png;base64," + base64.b64encode(png_bytes(laid)).decode()})
    assert_same_pixels(marked, decode(direct.json()["image"]))
    # Without the markup, the same edit draws from the photo alone: the images differ,
    # most where the rectangle was laid.
    diff = abs(pixels(marked) - pixels(_edit(oai))).mean(axis=2)
    left, top, right, bottom = SQUARE
    inside = diff[top:bottom, left:right].mean()
    outside = (diff.sum() - diff[top:bottom, left:right].sum()) / (diff.size - 32 * 24)
    assert inside > 1.3 * outside > 1.3, (inside, outside)  # (seen: 19.3 and 12.5 levels)


@pytest.mark.parametrize("files, reason", [
    ({"markup": ("m.png", _markup(ground=255), "image/png")}, "transparent pixels"),
    ({"markup": ("m.png", _markup(size=(32, 64)), "image/png")}, "32x64 but the image is 64x64"),
    ({"markup": ("m.png", _markup(), "image/png"),
      "mask": ("k.png", _markup(), "image/png")}, "cannot be combined with a mask"),
])
def test_a_bad_markup_is_refused_naming_it(oai, files, reason):
    with pytest.raises(openai.BadRequestError) as err:
        _edit(oai, **files)
    assert err.value.body["param"] == "markup" and reason in err.value.body["message"]


def test_a_variation_takes_no_markup(base_url):
    r = httpx.post(f"{base_url}/v1/images/variations", headers=AUTH, data={"model": FAST},
                   files={"image": ("p.png", png_bytes(PHOTO), "image/png"),
                          "markup": ("m.png", _markup(), "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "markup"
