"""Images of 256x256 pixels and more carry their model family's invisible watermark, read
back by the invisible-watermark library's decoder, through each API; `apply_watermark:
false` leaves it out, and then the pixels are the pipeline's. The decoder reads about half
of a message's bits wrong from an unmarked image (20-30 of SDXL's 48 on the tiny models'),
none from a marked one."""

import base64

import numpy as np
import openai
import pytest

from deployments.watermark import FLUX_MESSAGE, SDXL_MESSAGE, message_bits, watermarked
from tests.conftest import read_watermark
from tests.integration.conftest import API_KEY, FAST, FLUX, decode, pixels

SDXL_BITS, FLUX_BITS = message_bits(SDXL_MESSAGE), message_bits(FLUX_MESSAGE)
PNG = {"Accept": "image/png"}


def _wrong_bits(data: bytes, bits: np.ndarray) -> int:
    return int((read_watermark(data, len(bits)) != bits).sum())


def test_generate_marks_each_familys_images_unless_asked_not_to(client):
    for model, bits in ((FAST, SDXL_BITS), (FLUX, FLUX_BITS)):
        body = {"prompt": "a lighthouse", "seed": 5, "model": model, "width": 256,
                "height": 256, "num_outputs": 2}
        marked = [decode(b) for b in client.post("/generate", json=body).json()["images"]]
        plain = [decode(b) for b in client.post(
            "/generate", json={**body, "apply_watermark": False}).json()["images"]]
        for m, p in zip(marked, plain):
            assert np.array_equal(read_watermark(m, len(bits)), bits), model
            assert (read_watermark(p, len(bits)) != bits).sum() >= 12  # about half, at random
            # The mark is all that differs: the served image is the unmarked one, marked.
            assert np.array_equal(pixels(watermarked(p, bits)), pixels(m))
            diff = np.abs(pixels(m) - pixels(p))
            assert diff.max() > 0 and diff[..., 0].max() == 0, model  # red never moves


@pytest.mark.parametrize("width, height", [(128, 128), (512, 64)])
def test_small_images_go_out_as_the_pipeline_made_them(client, width, height):
    """Under 256x256 pixels in all, whatever the width (the library refuses to mark them)."""
    body = {"prompt": "a lighthouse", "seed": 5, "model": FAST, "width": width,
            "height": height}
    marked, plain = (decode(client.post("/generate", json=b).json()["image"])
                     for b in (body, {**body, "apply_watermark": False}))
    assert marked.size == (width, height)
    assert np.array_equal(pixels(marked), pixels(plain))


def test_replicate_and_openai_images_carry_sdxls_mark(base_url, rep):
    size = {"width": 256, "height": 256}
    (png,) = rep.run(FAST, input={"prompt": "a lighthouse", "seed": 8, **size})
    assert _wrong_bits(png.read(), SDXL_BITS) == 0
    (png,) = rep.run(FAST, input={"prompt": "a lighthouse", "seed": 8, "apply_watermark": False,
                                  **size})
    assert _wrong_bits(png.read(), SDXL_BITS) >= 12
    oai = openai.OpenAI(api_key=API_KEY, base_url=f"{base_url}/v1", max_retries=0)
    (image,) = oai.images.generate(model=FAST, prompt="a lighthouse", size="256x256",
                                   response_format="b64_json").data
    assert _wrong_bits(base64.b64decode(image.b64_json), SDXL_BITS) == 0
