"""Input images: decoded within limits, oriented, converted; transparency marks what to
repaint; bad data gets its 4xx."""

import asyncio
import base64
import io
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

import serve.images
from serve.config import ModelConfig
from serve.errors import InvalidField, TooLarge
from serve.images import ImageFetcher, decode_base64, open_image, open_mask, output_size
from serve.source_images import source_image
from serve.state import MemoryStore
from tests.conftest import trickling

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


PHOTO = np.random.default_rng(3).integers(0, 256, (16, 24, 3), dtype=np.uint8)
SDXL = ModelConfig(id="a/sdxl", family="sdxl", embedded="tiny-sdxl")


def _with_hole(alpha_at_hole=0, edge=None) -> Image.Image:
    """The photo as OpenAI's masks are made: opaque, with a transparent hole (columns 4–9)
    and optionally a half-transparent column beside it."""
    alpha = np.full((16, 24), 255, np.uint8)
    alpha[:, 4:10] = alpha_at_hole
    if edge is not None:
        alpha[:, 10] = edge
    return Image.fromarray(np.dstack([PHOTO, alpha]), "RGBA")


def test_a_mask_with_transparency_repaints_its_transparent_part_whatever_its_colours():
    image = Image.fromarray(PHOTO)
    mask = np.asarray(open_mask(_encode(_with_hole(edge=128)), "mask", image, MB, 10_000))
    assert (mask[:, 4:10] == 255).all() and (mask[:, 10] == 127).all()
    assert (mask[:, :4] == 0).all() and (mask[:, 11:] == 0).all()
    # A fully opaque RGBA mask is read by its grey levels, as an RGB one is.
    opaque = np.asarray(open_mask(_encode(_with_hole(alpha_at_hole=255)), "mask", image, MB,
                                  10_000))
    assert np.array_equal(opaque, np.asarray(Image.fromarray(PHOTO).convert("L")))


def test_an_image_with_transparency_and_no_mask_is_inpainted_in_its_transparent_part():
    source, width, height = source_image(_encode(_with_hole()), None, 0.8, None, None, SDXL)
    assert (width, height) == (24, 16) and source.strength == 0.8
    mask = np.frombuffer(source.mask, np.uint8).reshape(16, 24)
    assert (mask[:, 4:10] == 255).all() and mask[:, :4].max() == 0 and mask[:, 10:].max() == 0
    rgb = np.frombuffer(source.rgb, np.uint8).reshape(16, 24, 3)
    assert (rgb[:, 4:10] == 255).all() and np.array_equal(rgb[:, 10:], PHOTO[:, 10:])
    # Given a mask, that one counts; a variation's image (hole_is_mask=False) has none.
    given, _, _ = source_image(_encode(_with_hole()), _encode(Image.new("L", (24, 16), 0)),
                               0.8, None, None, SDXL)
    assert set(given.mask) == {0}
    flat, _, _ = source_image(_encode(_with_hole()), None, 0.8, None, None, SDXL,
                              hole_is_mask=False)
    assert flat.mask is None and flat.rgb == source.rgb


def test_opaque_images_and_palette_transparency():
    opaque, _, _ = source_image(_encode(_with_hole(alpha_at_hole=255)), None, 0.8, None, None,
                                SDXL)
    assert opaque.mask is None  # an alpha channel with nothing transparent: img2img
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((2, 3), 1)
    source, _, _ = source_image(_encode(palette, transparency=1), None, 0.8, None, None, SDXL)
    mask = np.frombuffer(source.mask, np.uint8).reshape(8, 8)
    assert mask[3, 2] == 255 and mask.sum() == 255
    rgb = np.frombuffer(source.rgb, np.uint8).reshape(8, 8, 3)
    assert tuple(rgb[3, 2]) == (255, 255, 255) and tuple(rgb[0, 0]) == (10, 20, 30)


def test_a_host_that_trickles_its_bytes_is_cut_off_with_a_422(monkeypatch):
    """Every read comes within the per-read time-out; the whole fetch has its own."""
    monkeypatch.setattr(serve.images, "_FETCH_TOTAL_S", 1)
    sent = []

    async def fetch():
        server = await asyncio.start_server(trickling(b"x" * 1000, sent), "127.0.0.1", 0)
        host = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server, httpx.AsyncClient() as client:
            fetcher = ImageFetcher([host], client, MemoryStore(60, MB))
            with pytest.raises(InvalidField) as refused:
                await fetcher.fetch(f"http://{host}/slow.png", "image", MB)
            return refused.value, time.monotonic()

    refused, ended = asyncio.run(fetch())
    assert refused.field == "image" and "took over 1s" in refused.reason
    assert 5 <= len(sent) < 40 and ended - sent[0] < 3  # cut off midway, not at the end
