"""img2img and inpainting through `/generate` on the running app; bad images get 4xx."""

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import FileServer
from tests.integration.conftest import (
    AUTH,
    FAST,
    decode,
    pixels,
    post_many,
    post_misframed,
)
from tests.pictures import png_bytes

RNG = np.random.default_rng(3)
PHOTO = RNG.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 96 wide, 64 high


def _b64(image, fmt="PNG"):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _body(**extra):
    return {"model": FAST, "prompt": "the product on a marble counter", "steps": 4,
            "seed": 11, "image": _b64(Image.fromarray(PHOTO)), **extra}


def test_output_takes_the_input_size_rounded_to_multiples_of_8(client):
    r = client.post("/generate", json=_body(prompt_strength=0.6))
    assert r.status_code == 200, r.text
    assert decode(r.json()["image"]).size == (96, 64)
    odd = Image.fromarray(RNG.integers(0, 256, (70, 100, 3), dtype=np.uint8))
    r = client.post("/generate", json=_body(image=_b64(odd)))
    assert (r.json()["width"], r.json()["height"]) == (96, 64)
    r = client.post("/generate", json=_body(width=128))
    assert decode(r.json()["image"]).size == (128, 64)


def test_strength_zero_returns_the_input_pixels(client):
    r = client.post("/generate", json=_body(prompt_strength=0))
    assert np.array_equal(pixels(decode(r.json()["image"])), PHOTO.astype(int))


def test_five_variations_of_one_photo_all_differ(base_url):
    bodies = [_body(seed=100 + i, prompt=f"the product, scene {i}") for i in range(5)]
    responses = post_many(base_url, bodies)
    assert [r.status_code for r in responses] == [200] * 5
    images = [pixels(decode(r.json()["image"])) for r in responses]
    assert [r.json()["seed"] for r in responses] == [100, 101, 102, 103, 104]
    assert all(im.shape == (64, 96, 3) for im in images)
    for i in range(5):
        for j in range(i + 1, 5):
            assert np.abs(images[i] - images[j]).mean() > 1


def test_inpainting_keeps_the_unmasked_pixels(client):
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:72] = 255
    r = client.post("/generate", json=_body(mask=_b64(Image.fromarray(mask))))
    out = pixels(decode(r.json()["image"]))
    diff = np.abs(out - PHOTO.astype(int))
    assert diff[mask == 0].max() == 0 and diff[mask == 255].mean() > 20


def _bomb_png(side):
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                            + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                            + chunk(b"IEND", b"")).decode()


def test_bad_images_get_their_4xx_and_the_server_keeps_serving(client):
    truncated = _b64(Image.fromarray(PHOTO))[:200]
    cases = [
        (_body(image="this is not base64!"), 422, "image"),
        (_body(image=truncated), 422, "image"),
        (_body(image=_bomb_png(20_000)), 413, "image"),
        (_body(mask=_b64(Image.new("L", (32, 32), 255))), 422, "mask"),
        ({**_body(mask=_b64(Image.new("L", (96, 64), 255))), "image": None}, 422, "mask"),
    ]
    for body, status, field in cases:
        r = client.post("/generate", json=body)
        assert r.status_code == status, (field, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", field]
    ok = client.post("/generate", json=_body())
    assert ok.status_code == 200
    assert httpx.get(f"{client.base_url}/healthz", headers=AUTH).status_code == 200


def test_replicate_client_sends_the_photo_as_a_file_and_gets_it_back_at_strength_0(base_url):
    import replicate

    from tests.integration.conftest import API_KEY

    rep = replicate.Client(api_token=API_KEY, base_url=base_url)
    buf = io.BytesIO()
    Image.fromarray(PHOTO).save(buf, format="PNG")
    buf.seek(0)
    (kept,) = rep.run(FAST, input={"prompt": "x", "image": buf, "prompt_strength": 0},
                      file_encoding_strategy="base64")
    assert np.array_equal(pixels(Image.open(io.BytesIO(kept.read()))), PHOTO.astype(int))
    mask = np.zeros((64, 96), np.uint8)
    mask[:, 48:] = 255
    (painted,) = rep.run(FAST, input={"prompt": "x", "image": _b64(Image.fromarray(PHOTO)),
                                      "mask": _b64(Image.fromarray(mask)), "seed": 4,
                                      "num_inference_steps": 4})
    diff = np.abs(pixels(Image.open(io.BytesIO(painted.read()))) - PHOTO.astype(int))
    assert diff[:, :48].max() == 0 and diff[:, 48:].mean() > 20


def test_replicate_bad_image_is_a_422_naming_the_input_field(base_url):
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "image": "data:image/png;base64,AAAA"}})
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.image"
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "image": _bomb_png(20_000)}})
    assert r.status_code == 413
    assert r.json()["invalid_fields"][0]["field"] == "input.image"


@pytest.fixture(scope="module")
def photo_server():
    """An HTTP server on 127.0.0.1 (an allowed image host) with the photo at /photo.png;
    /moved redirects to it, anything else is 404."""
    buf = io.BytesIO()
    Image.fromarray(PHOTO).save(buf, format="PNG")
    server = FileServer({"/photo.png": buf.getvalue()}, {"/moved": "/photo.png"})
    yield server
    server.close()


def test_image_urls_are_fetched_only_from_allowed_hosts(client, base_url, photo_server):
    url = photo_server.url
    r = client.post("/generate", json=_body(image=f"{url}/photo.png", prompt_strength=0))
    assert r.status_code == 200, r.text
    assert np.array_equal(pixels(decode(r.json()["image"])), PHOTO.astype(int))
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", headers={**AUTH, "Prefer": "wait"},
                   json={"input": {"prompt": "x", "image": f"{url}/photo.png",
                                   "prompt_strength": 0}})
    assert r.json()["status"] == "succeeded"
    assert photo_server.paths == ["/photo.png", "/photo.png"]
    for image, reason in [(f"http://localhost:{url.rsplit(':', 1)[1]}/photo.png",
                           "image_allowed_hosts"),
                          (f"{url}/missing.png", "HTTP 404"), (f"{url}/moved", "HTTP 302")]:
        r = client.post("/generate", json=_body(image=image))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"]
        assert reason in r.json()["detail"][0]["msg"]
    assert photo_server.paths == ["/photo.png", "/photo.png", "/missing.png", "/moved"]


def test_replicate_client_uploads_file_inputs_and_the_url_reads_from_the_store(rep, base_url):
    """The client's default for a file input: POST /v1/files, then send `urls.get`."""
    photo = png_bytes(PHOTO)
    (kept,) = rep.run(FAST, input={"prompt": "x", "image": io.BytesIO(photo),
                                   "prompt_strength": 0})
    assert np.array_equal(pixels(Image.open(io.BytesIO(kept.read()))), PHOTO.astype(int))
    listed = [f for f in rep.files.list() if f.checksums["sha256"] == _sha256(photo)]
    assert len(listed) == 1 and listed[0].size == len(photo)
    assert listed[0].content_type == "image/png"
    assert listed[0].urls["get"] == f"{base_url}/v1/files/{listed[0].id}"
    inputs = {"prompt": "x", "seed": 5, "num_inference_steps": 4, "prompt_strength": 0.6}
    (uploaded,) = rep.run(FAST, input={**inputs, "image": io.BytesIO(photo)})
    (inline,) = rep.run(FAST, input={**inputs, "image": _b64(Image.fromarray(PHOTO))})
    assert np.array_equal(pixels(Image.open(io.BytesIO(uploaded.read()))),
                          pixels(Image.open(io.BytesIO(inline.read()))))


def _sha256(data):
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_files_api_keeps_details_serves_bytes_and_deletes(rep, base_url):
    import replicate

    photo = png_bytes(PHOTO)
    made = rep.files.create(io.BytesIO(photo), filename="shelf photo.png",
                            metadata={"job": 7})
    assert (made.name, made.size, made.metadata) == ("shelf photo.png", len(photo), {"job": 7})
    assert made.checksums["sha256"] == _sha256(photo) and made.expires_at > made.created_at
    assert rep.files.get(made.id).checksums == made.checksums
    url = f"{base_url}/v1/files/{made.id}/download"
    r = httpx.get(url, headers=AUTH)
    assert r.content == photo and r.headers["content-type"] == "image/png"
    assert httpx.get(url).status_code == 401  # uploads need the key, unlike outputs
    assert rep.files.delete(made.id) is True
    with pytest.raises(replicate.exceptions.ReplicateError) as gone:
        rep.files.get(made.id)
    assert gone.value.status == 404
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "image": made.urls["get"]}})
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == "input.image"
    assert f"no uploaded file {made.id}" in r.json()["detail"]


def test_files_api_refuses_bad_uploads_with_the_field(base_url):
    url = f"{base_url}/v1/files"
    cases = [({"files": {"other": ("a.png", b"x", "image/png")}}, "content"),
             ({"files": {"content": ("a.png", b"", "image/png")}}, "content"),
             ({"files": {"content": ("a.png", b"x", "image/png")},
               "data": {"metadata": "[1, 2]"}}, "metadata")]
    for kwargs, field in cases:
        r = httpx.post(url, headers=AUTH, **kwargs)
        assert r.status_code == 422, r.text
        assert r.json()["invalid_fields"][0]["field"] == field
    # Data the multipart parser refuses: a second file, or parts framed by another boundary.
    photo = ("a.png", png_bytes(PHOTO), "image/png")
    second = httpx.post(url, headers=AUTH, files=[("content", photo), ("content", photo)])
    misframed = post_misframed(url, {"content": photo})
    for r, reason in ((second, "Too many files"), (misframed, "Invalid multipart data")):
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["invalid_fields"][0]["field"] == "content"
        assert reason in r.json()["detail"]

