import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import (
    BATCHED,
    FAST,
    TWO_REPLICAS,
    assert_same_pixels,
    decode,
    pixels,
    same_pixels,
)


def test_query_string_request_returns_a_png_of_the_asked_size_and_seed(client):
    r = client.post("/generate?prompt=a+red+cube&width=64&height=64&steps=2&seed=7")
    assert r.status_code == 200
    body = r.json()
    assert (body["seed"], body["seeds"], body["model"]) == (7, [7], FAST)
    image = decode(body["image"])
    assert image.size == (64, 64) and image.mode == "RGB"
    assert body["images"] == [body["image"]]
    assert r.headers["x-atelier-seed"] == "7"


def test_same_seed_gives_the_same_image_and_another_seed_another_image(client):
    url = "/generate?prompt=a+red+cube&width=64&height=64&steps=2&seed={}"
    a, b, c = (client.post(url.format(s)).json()["image"] for s in (7, 7, 8))
    assert same_pixels(a, b) and a != b  # each signed on its own (content credentials)
    assert np.abs(pixels(decode(a)) - pixels(decode(c))).mean() > 10
    # Without labels (and so without credentials), the same bytes.
    unlabeled = [client.post(url.format(7) + f"&model={TWO_REPLICAS}").json()["image"]
                 for _ in range(2)]
    assert unlabeled[0] == unlabeled[1] and same_pixels(unlabeled[0], a)


def test_json_body_and_query_string_are_the_same_request(client):
    q = client.post("/generate?prompt=a+cat&width=64&height=128&steps=2&seed=3").json()
    j = client.post("/generate", json={"prompt": "a cat", "width": 64, "height": 128,
                                       "steps": 2, "seed": 3}).json()
    assert same_pixels(q["image"], j["image"]) and decode(j["image"]).size == (64, 128)


@pytest.mark.parametrize("width, height", [(64, 64), (128, 64), (64, 192), (256, 256)])
def test_sizes(client, width, height):
    r = client.post("/generate", json={"prompt": "x", "width": width, "height": height,
                                       "seed": 1})
    assert decode(r.json()["image"]).size == (width, height)


def test_absent_seed_is_drawn_returned_and_reproducible(client):
    first = client.post("/generate", json={"prompt": "a dog"}).json()
    again = client.post("/generate", json={"prompt": "a dog", "seed": first["seed"]}).json()
    assert 0 <= first["seed"] < 2**32 and same_pixels(again["image"], first["image"])


def test_num_outputs_gives_consecutive_seeds_and_distinct_images(client):
    body = client.post("/generate", json={"prompt": "a dog", "seed": 100, "num_outputs": 3}).json()
    assert body["seeds"] == [100, 101, 102] and len(body["images"]) == 3
    images = [decode(b) for b in body["images"]]
    assert np.abs(pixels(images[0]) - pixels(images[1])).mean() > 10
    alone = decode(client.post("/generate", json={"prompt": "a dog", "seed": 101}).json()["image"])
    assert_same_pixels(images[1], alone)


@pytest.mark.parametrize("fmt, magic, media", [("webp", b"RIFF", "image/webp"),
                                               ("jpeg", b"\xff\xd8\xff", "image/jpeg"),
                                               ("png", b"\x89PNG", "image/png")])
def test_accept_header_returns_the_image_itself(client, fmt, magic, media):
    r = client.post("/generate", json={"prompt": "x", "seed": 2, "output_format": fmt},
                    headers={"Accept": media})
    assert r.headers["content-type"] == media and r.content.startswith(magic)
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)


@pytest.mark.parametrize("accept, magic, png_answer", [
    ("image/jpeg", b"\xff\xd8\xff", "application/json"),  # a PNG it does not take: JSON
    ("image/webp, image/png;q=0.5", b"RIFF", "image/png")])
def test_without_output_format_accept_chooses_the_format(client, accept, magic, png_answer):
    r = client.post("/generate", json={"prompt": "x", "seed": 2}, headers={"Accept": accept})
    assert r.headers["content-type"] == accept.split(",")[0] and r.content.startswith(magic)
    png = client.post("/generate", json={"prompt": "x", "seed": 2, "output_format": "png"},
                      headers={"Accept": accept})  # output_format wins
    assert png.headers["content-type"] == png_answer
    body = png.content if png_answer == "image/png" else base64.b64decode(png.json()["image"])
    assert body.startswith(b"\x89PNG")


@pytest.mark.parametrize("accept, image", [("image/*, */*;q=0.8", True), ("image/png;q=0", False),
                                           ("application/json, image/png;q=0.5", False)])
def test_accept_qualities_choose_between_the_image_and_json(client, accept, image):
    r = client.post("/generate", json={"prompt": "x", "seed": 2}, headers={"Accept": accept})
    assert r.status_code == 200 and r.headers["x-atelier-seed"] == "2"
    if image:
        assert r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
    else:
        assert r.headers["content-type"] == "application/json" and r.json()["seed"] == 2


def test_alias_resolves_to_its_model(client):
    via_alias = client.post("/generate", json={"prompt": "x", "seed": 5,
                                               "model": "stability-ai/sdxl"}).json()
    direct = client.post("/generate", json={"prompt": "x", "seed": 5, "model": FAST}).json()
    assert via_alias["model"] == FAST and same_pixels(via_alias["image"], direct["image"])


@pytest.mark.parametrize("scheduler", ["K_EULER_ANCESTRAL", "DDIM", "DPMSolverMultistep",
                                       "HeunDiscrete", "KarrasDPM", "PNDM", "DPM++2MSDE",
                                       "LCM"])
def test_each_scheduler_answers_with_its_own_image(client, scheduler):
    euler = client.post("/generate", json={"prompt": "x", "seed": 4, "steps": 3}).json()
    other = client.post("/generate", json={"prompt": "x", "seed": 4, "steps": 3,
                                           "scheduler": scheduler}).json()
    assert decode(other["image"]).size == (64, 64) and other["image"] != euler["image"]


def test_timing_headers_describe_the_batch(client):
    r = client.post("/generate", json={"prompt": "x", "seed": 1, "model": BATCHED})
    h = r.headers
    assert h["x-atelier-batch-size"] == "1" and h["x-atelier-batch-requests"] == "1"
    # A lone request on the batched model waited out its 2 s window.
    assert 1900 <= float(h["x-atelier-queue-ms"]) < 10_000
    assert float(h["x-atelier-inference-ms"]) > 0
    assert h["server-timing"].startswith("queue;dur=")
    # Collections in the replica while it held the request: part of its stay there.
    gc_ms = float(h["x-atelier-gc-ms"])
    assert 0 <= gc_ms < float(h["x-atelier-queue-ms"]) + float(h["x-atelier-inference-ms"])
    assert f"gc;dur={gc_ms:.1f}" in h["server-timing"]
