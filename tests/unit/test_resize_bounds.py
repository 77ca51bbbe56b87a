"""A requested size is refused before an input image is resized to it where no image of
the model may have it: a resize to 99999999 pixels wide would take gigabytes of the
ingress's memory (or fail past a C long) before the request's own checks ran."""

import asyncio

import numpy as np
import pytest

from serve.config import default_config
from serve.controls import ControlParams, load_controls
from serve.errors import InvalidField
from serve.images import ImageFetcher
from serve.source_images import source_image
from tests.pictures import png_bytes

MODEL = default_config().models[0]  # the embedded SDXL, with a canny ControlNet
PHOTO = np.full((64, 64, 3), 90, np.uint8)
MASK = np.zeros((64, 64), np.uint8)
MASK[16:48, 16:48] = 255
HUGE = [99999999, 2**64]


@pytest.mark.parametrize("side", HUGE)
@pytest.mark.parametrize("crop", [None, 8])  # the whole image, or only the masked area
def test_an_input_image_is_not_resized_past_the_models_limits(side, crop):
    for width, height in ((side, 64), (64, side)):
        with pytest.raises(InvalidField) as refused:
            source_image(png_bytes(PHOTO), png_bytes(MASK), 0.8, width, height, MODEL,
                         padding_mask_crop=crop)
        assert refused.value.field == "width"
        assert refused.value.reason.startswith(
            f"width x height must be at most {1024 * 1024} pixels, got ")


@pytest.mark.parametrize("side", HUGE)
def test_a_control_image_is_not_resized_past_the_models_limits(side):
    control = ControlParams(png_bytes(PHOTO))
    with pytest.raises(InvalidField) as refused:
        asyncio.run(load_controls([control], side, 64, MODEL, ImageFetcher([], None, None)))
    assert refused.value.field == "width"


def test_sizes_within_the_limits_still_resize():
    source, width, height = source_image(png_bytes(PHOTO), None, 0.8, 1024, 1024, MODEL)
    assert (width, height) == (1024, 1024) and len(source.rgb) == 1024 * 1024 * 3
    (control,), width, height = asyncio.run(load_controls(
        [ControlParams(png_bytes(PHOTO))], 128, 64, MODEL, ImageFetcher([], None, None)))
    assert (width, height) == (128, 64) and len(control.rgb) == 128 * 64 * 3
