"""FLUX.1 Redux through `/generate`, Replicate's API (flux-redux-dev's input, with the
official client) and OpenAI's variations (with the official client), on the running app:
the picture steers the image at the model's size, a prompt-free request is a variation of
the picture alone, averaging its tokens down weakens it, the three APIs give the same
pixels, concurrent requests with and
without an image prompt keep their own pixels, and bad fields are refused in each API's
shape, naming them."""

import base64
import io

import numpy as np
import openai
import pytest
import replicate
from PIL import Image

from tests.integration.conftest import (
    CANNY,
    FAST,
    FILL,
    FLUX,
    KONTEXT,
    REDUX,
    assert_same_pixels,
    decode,
    noise,
    pixels,
    post_many,
)
from tests.pictures import png_bytes

PHOTO, OTHER = png_bytes(noise(1, (120, 80))), png_bytes(noise(2, (70, 150)))
PHOTO_B64, OTHER_B64 = (base64.b64encode(p).decode() for p in (PHOTO, OTHER))


def _generate(client, **fields) -> Image.Image:
    r = client.post("/generate", json={"model": REDUX, "seed": 31, **fields})
    assert r.status_code == 200, r.text
    return decode(r.json()["image"])


def test_the_picture_steers_the_image_with_or_without_a_prompt(client):
    plain = _generate(client, prompt="a vase")
    steered = _generate(client, prompt="a vase", redux_image=PHOTO_B64)
    assert steered.size == plain.size == (64, 64)  # the model's size, not the picture's
    assert np.abs(pixels(steered) - pixels(plain)).max() >= 6
    alone = _generate(client, redux_image=PHOTO_B64)  # no prompt: a variation of it
    other = _generate(client, redux_image=OTHER_B64)
    assert np.abs(pixels(alone) - pixels(other)).mean() > 0.1
    assert np.abs(pixels(alone) - pixels(steered)).mean() > 0.5  # the prompt restyles it
    assert_same_pixels(_generate(client, redux_image=PHOTO_B64), alone)  # seeded
    # Its 8x8 tokens averaged down to 2x2: the prompt's image moves less.
    weaker = _generate(client, prompt="a vase", redux_image=PHOTO_B64, redux_downsampling=4)
    assert 0 < np.abs(pixels(weaker) - pixels(plain)).mean() < np.abs(
        pixels(steered) - pixels(plain)).mean()


def test_replicate_and_openai_clients_get_generates_pixels(client, rep, oai):
    """flux-redux-dev's input (redux_image alone) through the official client, and an
    OpenAI variation, are /generate's prompt-free request of the same seed."""
    alone = _generate(client, redux_image=PHOTO_B64)
    files = rep.run("black-forest-labs/flux-redux-dev", input={
        "redux_image": io.BytesIO(PHOTO), "seed": 31, "output_format": "png"})
    assert len(files) == 1
    assert_same_pixels(Image.open(io.BytesIO(files[0].read())), alone)
    made = oai.images.create_variation(model=REDUX, image=("p.png", PHOTO, "image/png"), n=2,
                                       extra_body={"seed": 31})
    first, second = (decode(d.b64_json) for d in made.data)
    assert made.size == "64x64"
    assert_same_pixels(first, alone)
    assert_same_pixels(second, _generate(client, redux_image=PHOTO_B64, seed=32))
    # With a prompt (extra_body), it restyles the picture, as /generate's prompt does;
    # the downsampling goes along on each API.
    styled = oai.images.create_variation(model=REDUX, image=("p.png", PHOTO, "image/png"),
                                         extra_body={"seed": 31, "prompt": "a vase",
                                                     "redux_downsampling": 2})
    weaker = _generate(client, prompt="a vase", redux_image=PHOTO_B64, redux_downsampling=2)
    assert_same_pixels(decode(styled.data[0].b64_json), weaker)
    (file,) = rep.run("black-forest-labs/flux-redux-dev", input={
        "redux_image": io.BytesIO(PHOTO), "prompt": "a vase", "redux_downsampling": 2,
        "seed": 31, "output_format": "png"})
    assert_same_pixels(Image.open(io.BytesIO(file.read())), weaker)


def test_a_board_of_pictures_steers_as_both_on_every_api(client, rep, oai):
    """redux_image as a list: another image than either picture alone, the same from
    /generate, flux-redux-dev's input (a list of files) and OpenAI's extra_body."""
    board = _generate(client, prompt="a vase", redux_image=[PHOTO_B64, OTHER_B64])
    for picture in (PHOTO_B64, OTHER_B64):
        alone = _generate(client, prompt="a vase", redux_image=picture)
        assert np.abs(pixels(board) - pixels(alone)).mean() > 0.1
    files = rep.run("black-forest-labs/flux-redux-dev", input={
        "prompt": "a vase", "redux_image": [io.BytesIO(PHOTO), io.BytesIO(OTHER)], "seed": 31,
        "output_format": "png"})
    assert_same_pixels(Image.open(io.BytesIO(files[0].read())), board)
    made = oai.images.generate(model=REDUX, prompt="a vase", size="64x64", extra_body={
        "seed": 31, "redux_image": ["data:image/png;base64," + p for p in (PHOTO_B64, OTHER_B64)]})
    assert_same_pixels(decode(made.data[0].b64_json), board)


def test_concurrent_requests_with_and_without_a_picture_keep_their_own_pixels(
        base_url, client):
    bodies = [{"model": REDUX, "seed": 50 + i, **extra} for i, extra in enumerate(
        [{"redux_image": PHOTO_B64}, {"prompt": "a chair"},
         {"redux_image": OTHER_B64, "prompt": "a chair"}, {"redux_image": OTHER_B64}])]
    alone = [_generate(client, **body) for body in bodies]
    crowd = post_many(base_url, bodies)
    assert [r.status_code for r in crowd] == [200] * 4
    batches = [r.headers["x-atelier-batch-id"] for r in crowd]
    assert batches[1] not in {batches[0], batches[2], batches[3]}  # fewer prompt tokens
    assert len(set(batches[0::2] + batches[3:])) == 1  # the 500 ms window gathers them
    for own, shared in zip(alone, crowd, strict=True):
        assert_same_pixels(own, decode(shared.json()["image"]))


def test_a_fill_model_draws_the_picture_into_the_masked_part_on_every_api(client, rep, oai):
    photo = np.asarray(noise(5, (96, 64)))
    hole = np.zeros((64, 96), np.uint8)
    hole[16:48, 32:80] = 255
    white = hole == 255
    body = {"model": FILL, "prompt": "a product on a table", "seed": 7,
            "image": "data:image/png;base64," + base64.b64encode(png_bytes(photo)).decode(),
            "mask": "data:image/png;base64," + base64.b64encode(png_bytes(hole)).decode()}
    plain, placed = (client.post("/generate", json=body | extra) for extra in (
        {}, {"redux_image": PHOTO_B64}))
    assert placed.status_code == 200, placed.text
    plain, placed = (pixels(decode(r.json()["image"])) for r in (plain, placed))
    assert np.array_equal(placed[~white], photo[~white])  # the photo kept
    assert np.abs(placed - plain)[white].max() >= 4  # the picture moved the fill
    (file,) = rep.run("black-forest-labs/flux-fill-dev", input={
        "prompt": "a product on a table", "image": io.BytesIO(png_bytes(photo)),
        "mask": io.BytesIO(png_bytes(hole)), "redux_image": io.BytesIO(PHOTO),
        "megapixels": "match_input", "seed": 7, "output_format": "png"})
    assert np.array_equal(pixels(Image.open(io.BytesIO(file.read()))), placed)
    edited = oai.images.edit(model=FILL, image=("p.png", png_bytes(photo), "image/png"),
                             mask=("m.png", png_bytes(hole), "image/png"),
                             prompt="a product on a table",
                             extra_body={"seed": 7, "redux_image": "data:image/png;base64,"
                                         + PHOTO_B64})
    assert np.array_equal(pixels(decode(edited.data[0].b64_json)), placed)


def test_a_kontext_edit_reads_the_picture_on_every_api(client, rep, oai):
    photo = np.asarray(noise(6, (96, 64)))
    body = {"model": KONTEXT, "prompt": "paint it in this style", "seed": 7,
            "image": "data:image/png;base64," + base64.b64encode(png_bytes(photo)).decode()}
    plain, styled = (client.post("/generate", json=body | extra) for extra in (
        {}, {"redux_image": PHOTO_B64}))
    assert styled.status_code == 200, styled.text
    plain, styled = (pixels(decode(r.json()["image"])) for r in (plain, styled))
    # The picture moved the edit (0.50 levels on average on the tiny models when written).
    assert styled.shape == (64, 112, 3) and np.abs(styled - plain).mean() > 0.2
    file = rep.run("black-forest-labs/flux-kontext-dev", input={
        "prompt": "paint it in this style", "input_image": io.BytesIO(png_bytes(photo)),
        "redux_image": io.BytesIO(PHOTO), "seed": 7, "output_format": "png"})
    assert np.array_equal(pixels(Image.open(io.BytesIO(file.read()))), styled)
    edited = oai.images.edit(model=KONTEXT, image=("p.png", png_bytes(photo), "image/png"),
                             prompt="paint it in this style",
                             extra_body={"seed": 7, "redux_image": "data:image/png;base64,"
                                         + PHOTO_B64})
    assert np.array_equal(pixels(decode(edited.data[0].b64_json)), styled)


def test_bad_redux_fields_are_refused_naming_the_field(client, rep, oai):
    cases = [({"model": FAST, "redux_image": PHOTO_B64}, "redux_image",
              "reads its image prompt from ip_adapter_image"),
             ({"model": FLUX, "redux_image": PHOTO_B64}, "redux_image",
              "reads its image prompt from ip_adapter_image"),
             ({"model": CANNY, "redux_image": PHOTO_B64}, "redux_image",
              "no IP-Adapter or Redux"),
             ({"redux_image": PHOTO_B64, "ip_adapter_image": PHOTO_B64}, "redux_image",
              "one image prompt"),
             ({"ip_adapter_image": PHOTO_B64}, "ip_adapter_image",
              "reads its image prompt from redux_image"),
             ({"redux_image": "bm90IGFuIGltYWdl"}, "redux_image", ""),
             ({"redux_image": PHOTO_B64, "redux_downsampling": 0}, "redux_downsampling", ""),
             ({"prompt": ""}, "prompt", "redux_image")]
    for fields, field, says in cases:
        r = client.post("/generate", json={"model": REDUX, "prompt": "x", **fields})
        assert r.status_code == 422, (fields, r.text)
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", field] and says in detail["msg"], detail
    with pytest.raises(replicate.exceptions.ReplicateError) as err:
        rep.run("black-forest-labs/flux-dev", input={"redux_image": io.BytesIO(PHOTO)})
    assert err.value.status == 422 and "input.redux_image" in str(err.value)
    with pytest.raises(replicate.exceptions.ReplicateError) as err:
        rep.run("black-forest-labs/flux-redux-dev", input={"seed": 1})
    assert err.value.status == 422 and "input.prompt" in str(err.value)
    with pytest.raises(openai.BadRequestError) as bad:
        oai.images.create_variation(model=REDUX, image=("p.png", PHOTO, "image/png"),
                                    extra_body={"redux_image": OTHER_B64})
    assert bad.value.body["param"] == "redux_image"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.images.create_variation(model=REDUX, image=("p.png", b"not an image", "image/png"))
    assert bad.value.body["param"] == "image"
