"""Outpainting on a FLUX.1 Fill model: `outpaint` sets the image on a larger canvas whose
border is drawn, the same input as an image a client padded with a transparent border;
flux-fill-pro's presets in pixels; a given mask is kept inside the canvas; an SDXL
inpainting checkpoint outpaints the same way, at strength 1; other models and canvases
over the input limit are refused, naming `outpaint`."""

import numpy as np
import pytest

from serve.canvases import outpaint_sides
from serve.config import ModelConfig
from serve.errors import InvalidField
from serve.source_images import source_image
from tests.pictures import png_bytes
from tests.unit.test_fill import MASK, MODEL, PHOTO

PICTURE = PHOTO[16:48, 24:72]  # 48 wide, 32 high


@pytest.mark.parametrize(("preset", "size", "sides"), [
    ("Zoom out 2x", (48, 32), (24, 16, 24, 16)),
    ("Zoom out 1.5x", (48, 32), (12, 8, 12, 8)),
    ("Make square", (48, 32), (0, 8, 0, 8)),
    ("Make square", (30, 51), (10, 0, 11, 0)),
    ("Make square", (40, 40), (0, 0, 0, 0)),
    ("Left outpaint", (48, 32), (24, 0, 0, 0)),
    ("Right outpaint", (48, 32), (0, 0, 24, 0)),
    ("Top outpaint", (48, 32), (0, 16, 0, 0)),
    ("Bottom outpaint", (48, 32), (0, 0, 0, 16)),
])
def test_presets_in_pixels_per_side(preset, size, sides):
    assert outpaint_sides(preset, *size) == sides


def test_outpainting_is_the_input_of_an_image_with_a_transparent_border():
    canvas = np.zeros((64, 96, 4), np.uint8)
    canvas[16:48, 24:72, :3] = PICTURE
    canvas[16:48, 24:72, 3] = 255
    padded, width, height = source_image(png_bytes(canvas, "RGBA"), None, 0.4, None, None, MODEL)
    for outpaint in ((24, 16, 24, 16), "Zoom out 2x"):
        made = source_image(png_bytes(PICTURE), None, 0.4, None, None, MODEL, outpaint=outpaint)
        source, made_width, made_height = made
        assert (made_width, made_height) == (width, height) == (96, 64)
        assert source.rgb == padded.rgb and source.mask == padded.mask
        assert source.strength == 1.0  # a Fill model draws the mask's part anew
    mask = np.frombuffer(padded.mask, np.uint8).reshape(64, 96)
    assert (mask == 255 - MASK).all()  # the border white, the picture black


def test_a_mask_is_kept_inside_the_canvas_and_a_size_rescales_it():
    hole = np.zeros((32, 48), np.uint8)
    hole[8:24, 12:36] = 255
    source, width, height = source_image(png_bytes(PICTURE), png_bytes(hole), 0.4, None, None, MODEL,
                                         outpaint=(16, 0, 0, 0))
    assert (width, height) == (64, 32)
    mask = np.frombuffer(source.mask, np.uint8).reshape(32, 64)
    assert (mask[:, :16] == 255).all() and np.array_equal(mask[:, 16:], hole)
    rgb = np.frombuffer(source.rgb, np.uint8).reshape(32, 64, 3)
    assert np.array_equal(rgb[:, 16:], PICTURE)
    # The canvas at another size (Replicate's megapixels): its shape kept, 2:1.
    _, width, height = source_image(png_bytes(PICTURE), None, 0.4, None, None, MODEL,
                                    area=128 * 64, outpaint=(16, 0, 0, 0))
    assert (width, height) == (128, 64)


def test_outpainting_is_refused_where_it_cannot_be_done():
    plain = ModelConfig(id="a/flux", family="flux", embedded="tiny-flux")
    small = MODEL.model_copy(update={"limits": MODEL.limits.model_copy(
        update={"max_image_pixels": 96 * 64})})
    cases = [(plain, (8, 0, 0, 0), "only FLUX.1 Fill models"),
             (small, (0, 0, 49, 0), "145x64, over this model's 6144 input pixels")]
    for model, outpaint, says in cases:
        with pytest.raises(InvalidField) as refused:
            source_image(png_bytes(PHOTO), None, 0.4, None, None, model, outpaint=outpaint)
        assert refused.value.field == "outpaint" and says in refused.value.reason
    source_image(png_bytes(PHOTO), None, 0.4, None, None, small, outpaint=(0, 0, 0, 0))


def test_an_sdxl_inpainting_checkpoint_outpaints_at_strength_one_and_a_plain_one_not():
    inpainting = ModelConfig(id="a/b", embedded="tiny-sdxl-inpainting", inpainting=True)
    source, width, height = source_image(png_bytes(PICTURE), None, 0.4, None, None, inpainting,
                                         outpaint="Left outpaint")
    assert (width, height, source.strength) == (72, 32, 1.0)
    mask = np.frombuffer(source.mask, np.uint8).reshape(32, 72)
    assert (mask[:, :24] == 255).all() and (mask[:, 24:] == 0).all()
    assert source_image(png_bytes(PICTURE), None, 0.4, None, None, inpainting)[0].strength == 0.4
    with pytest.raises(InvalidField) as refused:
        source_image(png_bytes(PICTURE), None, 0.4, None, None,
                     ModelConfig(id="a/b", embedded="tiny-sdxl"), outpaint="Left outpaint")
    assert refused.value.field == "outpaint" and "SDXL inpainting" in refused.value.reason


def test_replicates_fill_input_takes_flux_fill_pros_presets():
    from pydantic import ValidationError

    from serve.routes.replicate_flux import FillInput

    given = FillInput.model_validate({"prompt": "x", "image": "a", "outpaint": "Zoom out 2x"})
    assert given.outpainting() == "Zoom out 2x"
    assert FillInput.model_validate({"prompt": "x", "image": "a"}).outpainting() is None
    with pytest.raises(ValidationError) as refused:
        FillInput.model_validate({"prompt": "x", "image": "a", "outpaint": "Zoom out 3x"})
    assert refused.value.errors()[0]["loc"] == ("outpaint",)
