"""`/generate`'s answer by the client's Accept header (serve/routes/generate.py): the
image itself where the header prefers its type to JSON, by the header's qualities, and
in the image type it prefers where the request names no output_format."""

from __future__ import annotations

import pytest

from serve.routes.generate import format_for, wants_image

BROWSER = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"


@pytest.mark.parametrize("accept, image", [
    ("", False),  # no preference: JSON
    ("*/*", False),
    ("text/html", False),  # nothing acceptable: JSON all the same
    ("image/png", True),
    ("IMAGE/PNG", True),
    ("image/png; charset=x", True),
    ("image/*", True),
    (BROWSER, True),
    ("image/png, application/json", True),  # a tie, the image named
    ("application/json;q=0.5, image/png", True),
    ("image/png;q=0", False),  # refused outright
    ("image/*, image/png;q=0", False),  # the most specific range decides
    ("application/json, image/png;q=0.5", False),
    ("image/*;q=0.9, application/json;q=0.9", False),  # a tie, the image not named
    ("image/jpeg", False),  # another format: output_format picks it
    ("image/png;q=abc", False),  # a malformed quality names nothing
    ("image/png;q=nan", False),
    ("image/png;q=2", False),
])
def test_the_image_itself_where_accept_prefers_its_type_to_json(accept, image):
    assert wants_image(accept, "image/png") is image


def test_the_type_is_the_images_own():
    assert wants_image("image/webp", "image/webp") and not wants_image("image/webp", "image/png")
    assert wants_image("image/jpeg, image/png;q=0", "image/jpeg")


@pytest.mark.parametrize("accept, fmt", [
    ("", "png"),
    ("*/*", "png"),
    ("image/*", "png"),  # every type alike: PNG
    (BROWSER, "webp"),  # named, where PNG only comes under image/*
    ("image/jpeg", "jpeg"),
    ("image/webp", "webp"),
    ("image/jpeg;q=0.5, image/png", "png"),
    ("image/jpeg, image/png;q=0.5", "jpeg"),
    ("image/webp;q=0.9, */*", "png"),  # */* gives PNG quality 1
    ("image/jpeg, image/png", "png"),  # a tie: PNG
    ("application/json", "png"),
    ("image/*, image/png;q=0", "webp"),  # PNG refused
])
def test_without_output_format_the_format_is_the_image_type_accept_prefers(accept, fmt):
    assert format_for(accept) == fmt
