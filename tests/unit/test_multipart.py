"""Multipart forms read by the routes (OpenAI edits, Replicate's file uploads): their files,
which Starlette spools to temporary files, are closed once read, whatever the answer."""

import asyncio

import httpx
import pytest
from starlette.datastructures import UploadFile
from starlette.requests import Request

from serve.context import multipart_form
from serve.errors import InvalidField
from serve.routes.openai_images import _read_edit
from serve.routes.openai_params import ImageEditParams
from tests.pictures import png_bytes, scene

# Over Starlette's in-memory limit (1 MiB): this one is spooled to a file on disk.
LARGE = b"\x89PNG" + bytes(range(256)) * 5000


def _request(files, data=None, content_type=None) -> Request:
    """A real Starlette request over the multipart body httpx encodes for `files`."""
    built = httpx.Request("POST", "http://atelier.test/", files=files, data=data)
    body = built.read()
    headers = [(b"content-type", (content_type or built.headers["content-type"]).encode())]
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    # As in an app's scope (with "app", Starlette answers malformed data with a 400).
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers,
                    "query_string": b"", "app": None}, receive)


async def _uploads(request: Request) -> list[UploadFile]:
    """The files of the form the request has parsed (Starlette keeps it)."""
    return [v for _, v in (await request.form()).multi_items() if isinstance(v, UploadFile)]


def test_a_forms_files_are_open_inside_and_closed_after():
    request = _request({"content": ("big.bin", LARGE, "application/octet-stream"),
                        "other": ("small.txt", b"small", "text/plain")})

    async def scenario():
        async with multipart_form(request, "content", max_files=2, max_fields=4) as form:
            inside = [(await f.read(), f.file.closed) for f in await _uploads(request)]
            assert form.get("content").filename == "big.bin"
        return inside, [f.file.closed for f in await _uploads(request)]

    inside, after = asyncio.run(scenario())
    assert inside == [(LARGE, False), (b"small", False)]
    assert after == [True, True]


def test_a_forms_files_are_closed_when_reading_them_fails():
    request = _request({"content": ("big.bin", LARGE, "application/octet-stream")})

    async def scenario():
        with pytest.raises(InvalidField):
            async with multipart_form(request, "content", max_files=1, max_fields=4):
                raise InvalidField("content", "refused after reading")
        return [f.file.closed for f in await _uploads(request)]

    assert asyncio.run(scenario()) == [True]


@pytest.mark.parametrize("case", ["too_many_files", "malformed"])
def test_a_form_over_its_limits_or_malformed_is_refused_on_the_field(case):
    files = [("content", ("a.bin", b"a", "application/octet-stream")),
             ("content", ("b.bin", b"b", "application/octet-stream"))]
    request = (_request(files) if case == "too_many_files" else
               _request(files, content_type="multipart/form-data; boundary=elsewhere"))

    async def scenario():
        async with multipart_form(request, "content", max_files=1, max_fields=4):
            pass

    with pytest.raises(InvalidField) as caught:
        asyncio.run(scenario())
    assert caught.value.field == "content"
    assert "not a valid multipart/form-data body" in caught.value.reason


def test_an_edits_image_files_are_closed_once_read():
    picture = png_bytes(scene())
    request = _request([("image", ("edit.png", picture, "image/png")),
                        ("image[]", ("ref.png", LARGE, "image/png"))],
                       data={"prompt": "a red cube", "n": "2"})

    async def scenario():
        read = await _read_edit(request, ImageEditParams)
        return read, [f.file.closed for f in await _uploads(request)]

    (params, images, mask, markup), closed = asyncio.run(scenario())
    assert (params.prompt, params.n, mask, markup) == ("a red cube", 2, None, None)
    assert images == [picture, LARGE] and closed == [True, True]
