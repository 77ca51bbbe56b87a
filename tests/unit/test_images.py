"""Input images: decoded within limits, oriented, converted; bad data gets its 4xx."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serve.errors import InvalidField, TooLarge
from serve.images import decode_base64, open_image, open_mask, output_size

MB = 1 << 20


def _encode(image, fmt="PNG", **kwargs):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bomb_png(width, height):
    """A valid PNG signature and header claiming width x height, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = _chunk
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_a_data_uri_and_plain_base64_give_the_same_bytes():
    raw = _encode(Image.new("RGB", (8, 8), "red"))
    b64 = base64.b64encode(raw).decode()
    assert decode_base64(f"data:image/png;base64,{b64}", "image", MB) == raw
    assert decode_base64(b64, "image", MB) == raw


@pytest.mark.parametrize("value", ["not base64 at all!", "data:image/png;base64,@@@@"])
def test_undecodable_base64_is_a_422_naming_the_field(value):
    with pytest.raises(InvalidField) as err:
        decode_base64(value, "image", MB)
    assert err.value.status == 422 and err.value.field == "image"


def test_base64_over_the_byte_limit_is_a_413_before_decoding():
    with pytest.raises(TooLarge) as err:
        decode_base64("A" * 4000, "image", 1000)
    assert err.value.status == 413 and err.value.field == "image"


def test_rgb_image_round_trips_pixel_for_pixel():
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    image = open_image(_encode(Image.fromarray(pixels)), "image", MB, 10_000)
    assert image.mode == "RGB" and image.size == (40, 24)
    assert np.array_equal(np.asarray(image), pixels)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    opened = open_image(_encode(image, "JPEG", exif=exif), "image", MB, 10_000)
    assert opened.size == (20, 40)


def test_transparency_is_flattened_onto_white_and_grey_becomes_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    flat = np.asarray(open_image(_encode(rgba), "image", MB, 100))
    assert tuple(flat[0, 0]) == (255, 0, 0) and tuple(flat[1, 1]) == (255, 255, 255)
    grey = np.asarray(open_image(_encode(Image.new("L", (4, 4), 77)), "image", MB, 100))
    assert grey.shape == (4, 4, 3) and (grey == 77).all()


@pytest.mark.parametrize("data", [b"", b"hello, not an image", _encode(Image.new(
    "RGB", (64, 64)))[:60]])
def test_undecodable_or_truncated_data_is_a_422(data):
    with pytest.raises(InvalidField) as err:
        open_image(data, "image", MB, 10_000)
    assert err.value.status == 422 and err.value.field == "image"


@pytest.mark.parametrize("side", [200, 20_000])
def test_a_header_claiming_too_many_pixels_is_refused_without_decoding(side):
    data = _bomb_png(side, side)
    assert len(data) < 100
    with pytest.raises(TooLarge) as err:
        open_image(data, "image", MB, 100 * 100)
    # Its pixel data is not there: decoding would have failed with a 422, not this 413.
    assert err.value.status == 413 and err.value.field == "image"
    assert "over 10000 pixels" in err.value.message


def test_a_mask_of_another_size_is_a_422_naming_the_mask():
    image = Image.new("RGB", (32, 32))
    with pytest.raises(InvalidField) as err:
        open_mask(_encode(Image.new("L", (16, 32), 255)), "mask", image, MB, 10_000)
    assert err.value.field == "mask" and "16x32" in err.value.message
    mask = open_mask(_encode(Image.new("RGB", (32, 32), "white")), "mask", image, MB, 10_000)
    assert mask.mode == "L" and np.asarray(mask).min() == 255


def test_output_size_follows_the_input_rounded_to_multiples_of_8():
    image = Image.new("RGB", (1001, 67))
    assert output_size(image, None, None) == (1000, 64)
    assert output_size(image, 512, None) == (512, 64)
    assert output_size(Image.new("RGB", (5, 5)), None, None) == (8, 8)


def test_a_too_large_error_keeps_its_413_when_located_elsewhere():
    moved = TooLarge("image", "too big").at("query")
    assert isinstance(moved, TooLarge) and moved.status == 413 and moved.source == "query"
