"""The invisible watermark, read back with the `invisible-watermark` library's decoder: the
one that detectors of Stability AI's SDXL and Black Forest Labs' FLUX.1 marks run."""

import cv2
import numpy as np
import pytest

from deployments.encoding import encode_image
from deployments.watermark import FLUX_MESSAGE, SDXL_MESSAGE, message_bits, watermarked
from load.bench_watermark import picture, psnr
from tests.conftest import read_watermark as read


def test_the_messages_are_the_reference_codes_bits():
    sdxl, flux = message_bits(SDXL_MESSAGE), message_bits(FLUX_MESSAGE)
    assert "".join(map(str, sdxl)) == "101100111110110010010000011110111011000110011110"
    # FLUX.1's message starts with two zeros, which the reference's bin() drops.
    assert "".join(map(str, flux)) == "1010101111111010000111100111001111010100101110"


@pytest.mark.parametrize("message", [SDXL_MESSAGE, FLUX_MESSAGE], ids=["sdxl", "flux"])
@pytest.mark.parametrize("size", [(1024, 1024), (1344, 768), (258, 301)])
def test_the_reference_decoder_reads_the_message(message, size):
    bits = message_bits(message)
    image = picture(*size)
    marked = watermarked(image, bits)
    assert marked.size == image.size and marked.mode == "RGB"
    assert np.array_equal(read(marked, len(bits)), bits)
    # Without the mark the decoder reads noise: about half the bits wrong.
    assert (read(image, len(bits)) != bits).sum() >= len(bits) // 4
    assert psnr(image, marked) > 40


def test_the_mark_survives_png_encoding_with_the_label():
    bits = message_bits(SDXL_MESSAGE)
    data = encode_image(watermarked(picture(512, 512, seed=3), bits), "png", 90, "acme/sdxl")
    assert np.array_equal(read(data, len(bits)), bits)


def test_only_the_blue_difference_channel_moves():
    """Luma and V, as OpenCV computes them from 8-bit BGR, move by rounding alone, except
    where green, which makes up blue's share of luma, is at the end of its range; the
    rows and columns past the last multiple of 4 are left as they were."""
    image = picture(258, 301, seed=1)
    marked = watermarked(image, message_bits(SDXL_MESSAGE))
    before, after = (cv2.cvtColor(np.asarray(im)[:, :, ::-1].copy(), cv2.COLOR_BGR2YUV)
                     .astype(int) for im in (image, marked))
    moved = np.abs(after - before)
    off = (moved[..., 0] > 1) | (moved[..., 2] > 1)
    assert off.sum() <= 20 and np.isin(np.asarray(marked)[..., 1][off], (0, 255)).all()
    assert (moved[..., 1] > 1).sum() > 1000  # U carries the mark
    a, b = np.asarray(image), np.asarray(marked)
    assert np.array_equal(a[300:], b[300:]) and np.array_equal(a[:, 256:], b[:, 256:])


def test_small_images_and_no_message_leave_the_image_alone():
    bits = message_bits(SDXL_MESSAGE)
    small = picture(255, 256)  # under 256x256 pixels: the reference refuses them
    assert watermarked(small, bits) is small
    image = picture(256, 256)
    assert watermarked(image, None) is image
    assert not np.array_equal(np.asarray(watermarked(image, bits)), np.asarray(image))
