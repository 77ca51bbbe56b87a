"""FLUX beside SDXL on the running app, through every API; OpenAI image edits (multipart);
request bodies over the configured size are refused with 413 before they are read."""

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from serve.model_parts import MOST_REFERENCES
from tests.integration.conftest import (
    AUTH,
    FAST,
    FLUX,
    KONTEXT,
    MAX_BODY_BYTES,
    decode,
    pixels,
    post_misframed,
    same_pixels,
)
from tests.pictures import png_bytes

RNG = np.random.default_rng(8)
PHOTO = RNG.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 96 wide, 64 high


def test_generate_routes_by_model_and_flux_keeps_its_seed_guarantee(client):
    body = {"prompt": "a leather bag", "seed": 21, "model": "black-forest-labs/flux-dev"}
    a, b = (client.post("/generate", json=body) for _ in range(2))
    assert a.status_code == 200, a.text
    assert a.json()["model"] == FLUX and (a.json()["width"], a.json()["height"]) == (64, 64)
    assert np.array_equal(pixels(decode(a.json()["image"])), pixels(decode(b.json()["image"])))
    other = client.post("/generate", json={**body, "seed": 22}).json()
    assert np.abs(pixels(decode(other["image"])) - pixels(decode(a.json()["image"]))).mean() > 1
    sdxl = client.post("/generate", json={**body, "model": FAST}).json()
    assert sdxl["model"] == FAST


@pytest.mark.parametrize("extra, field", [({"width": 72}, "width"),
                                           ({"negative_prompt": "blur"}, "negative_prompt"),
                                           ({"scheduler": "K_EULER"}, "scheduler"),
                                           ({"loras": [{"name": "pixel-art"}]}, "loras")])
def test_flux_refuses_what_its_family_does_not_take(client, extra, field):
    r = client.post("/generate", json={"prompt": "x", "model": FLUX, **extra})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field]


def test_openai_generations_on_flux(oai):
    resp = oai.images.generate(model=FLUX, prompt="a red cube", size="128x64", n=2)
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in resp.data]
    assert [im.size for im in images] == [(128, 64)] * 2
    assert images[0].tobytes() != images[1].tobytes()


def test_replicate_flux_inputs_with_the_official_client(rep, base_url):
    version = httpx.get(f"{base_url}/v1/models/black-forest-labs/flux-dev", headers=AUTH).json()
    schema = version["latest_version"]["openapi_schema"]["components"]["schemas"]["Input"]
    assert {"aspect_ratio", "megapixels", "guidance", "go_fast"} <= set(schema["properties"])
    assert "negative_prompt" not in schema["properties"]
    (webp,) = rep.run("black-forest-labs/flux-dev", input={"prompt": "a lamp", "seed": 3})
    data = webp.read()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    kept = rep.run(FLUX, input={"prompt": "x", "image": io.BytesIO(png_bytes(PHOTO)),
                                "prompt_strength": 0, "output_format": "png"},
                   file_encoding_strategy="base64")
    assert np.array_equal(pixels(Image.open(io.BytesIO(kept[0].read()))), PHOTO.astype(int))


def test_replicate_flux_sizes_beyond_the_limits_name_aspect_ratio(base_url):
    r = httpx.post(f"{base_url}/v1/models/{FLUX}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "aspect_ratio": "16:9"}})
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.aspect_ratio"
    r = httpx.post(f"{base_url}/v1/models/{FLUX}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "negative_prompt": "blur"}})
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.negative_prompt"


def _flux(client, **extra):
    r = client.post("/generate", json={"prompt": "a lamp", "seed": 5, "model": FLUX, **extra})
    assert r.status_code == 200, r.text
    return r, pixels(decode(r.json()["image"]))


def test_flux_adapters_change_the_image_as_the_loras_field_or_a_prompt_tag(client):
    rows = {row["name"]: row for row in client.get("/v1/loras").json()["data"]}
    assert {n: (rows[n]["base_model"], rows[n]["layout"]) for n in ("neon", "ink")} == {
        "neon": ("flux", "peft"), "ink": ("flux", "kohya")}
    _, base = _flux(client)
    held, neon = _flux(client, loras=[{"name": "neon", "scale": 0.8}])
    assert "neon" in held.headers["X-Atelier-Adapters-Held"].split(",")
    _, tagged = _flux(client, prompt="a lamp <lora:neon:0.8>")
    _, zero = _flux(client, loras=[{"name": "neon", "scale": 0}])
    _, ink = _flux(client, loras=[{"name": "ink"}])
    assert np.array_equal(tagged, neon) and np.array_equal(zero, base)
    assert min(np.abs(neon - base).mean(), np.abs(ink - base).mean(),
               np.abs(ink - neon).mean()) > 2


def test_openai_prompt_tags_apply_adapters_with_a_seed_from_extra_body(oai, client):
    resp = oai.images.generate(model=FLUX, prompt="a lamp <lora:neon:0.8>",
                               extra_body={"seed": 5})
    tagged = pixels(Image.open(io.BytesIO(base64.b64decode(resp.data[0].b64_json))))
    _, neon = _flux(client, loras=[{"name": "neon", "scale": 0.8}])
    _, base = _flux(client)
    assert np.array_equal(tagged, neon) and np.abs(tagged - base).mean() > 2
    with pytest.raises(openai.NotFoundError):
        oai.images.generate(model=FLUX, prompt="a lamp <lora:no-such-style>")
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(model=FLUX, prompt="a lamp <lora:pixel-art>")
    assert err.value.response.json()["error"]["param"] == "prompt"


def test_the_catalog_lists_what_one_model_can_use(client):
    def names(model):
        r = client.get("/v1/loras", params={"model": model})
        assert r.status_code == 200, r.text
        return {row["name"] for row in r.json()["data"]}

    assert names("black-forest-labs/flux-dev") == {"neon", "film-grain", "ink",
                                                   "acme/ink-style", "acme/ink-style/v2"}
    sdxl = names(FAST)
    assert {"pixel-art", "watercolor", "sketch"} <= sdxl
    assert not sdxl & {"neon", "ink", "for-other"}
    r = client.get("/v1/loras", params={"model": "acme/none"})
    assert r.status_code == 404 and "acme/none" in r.text


def test_replicate_flux_lora_inputs_give_the_generate_pixels(rep, client, base_url):
    schema = httpx.get(f"{base_url}/v1/models/{FLUX}", headers=AUTH).json()[
        "latest_version"]["openapi_schema"]["components"]["schemas"]["Input"]
    assert {"lora_weights", "lora_scale", "extra_lora", "extra_lora_scale"} <= set(
        schema["properties"])
    # Replicate's trained FLUX models take a mask for inpainting.
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 32:80] = 255
    (inpainted,) = rep.run(FLUX, input={
        "prompt": "a lamp", "seed": 5, "image": io.BytesIO(png_bytes(PHOTO)),
        "mask": io.BytesIO(png_bytes(mask)), "output_format": "png"},
        file_encoding_strategy="base64")
    diff = np.abs(pixels(Image.open(io.BytesIO(inpainted.read()))) - PHOTO.astype(int))
    assert diff[mask == 0].max() == 0 and diff[mask == 255].mean() > 20
    (png,) = rep.run(FLUX, input={"prompt": "a lamp", "seed": 5, "lora_weights": "ink",
                                  "lora_scale": 0.7, "extra_lora": "neon",
                                  "extra_lora_scale": 0.5, "output_format": "png"})
    _, both = _flux(client, loras=[{"name": "neon", "scale": 0.5}, {"name": "ink", "scale": 0.7}])
    assert np.array_equal(pixels(Image.open(io.BytesIO(png.read()))), both)


def test_replicate_model_names_find_the_adapters_filed_under_them(rep, client):
    """`<owner>/<model>` and `<owner>/<model>/<version>`, as Replicate's LoRA inputs take
    them, name the files at those paths in a LoRA folder (copies of `ink` and `neon`)."""
    (png,) = rep.run(FLUX, input={"prompt": "a lamp", "seed": 5, "lora_weights": "acme/ink-style",
                                  "lora_scale": 0.7, "extra_lora": "acme/ink-style/v2",
                                  "extra_lora_scale": 0.5, "output_format": "png"})
    _, both = _flux(client, loras=[{"name": "neon", "scale": 0.5}, {"name": "ink", "scale": 0.7}])
    _, base = _flux(client)
    assert np.array_equal(pixels(Image.open(io.BytesIO(png.read()))), both)
    assert np.abs(both - base).mean() > 2
    _, tagged = _flux(client, prompt="a lamp <lora:acme/ink-style:0.7>")
    _, ink = _flux(client, loras=[{"name": "ink", "scale": 0.7}])
    assert np.array_equal(tagged, ink)
    r = client.post("/generate", json={"prompt": "x", "model": FLUX,
                                       "loras": [{"name": "acme/no-such-style"}]})
    assert r.status_code == 404 and "acme/no-such-style" in r.text


@pytest.mark.parametrize("model, name, family", [(FLUX, "pixel-art", "sdxl"),
                                                  (FAST, "neon", "flux")])
def test_an_adapter_of_the_other_family_is_422_on_every_api(client, base_url, model, name,
                                                          family):
    r = client.post("/generate", json={"prompt": "x", "model": model,
                                       "loras": [{"name": name}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "loras"]
    assert f"is for {family}" in r.json()["detail"][0]["msg"]
    r = httpx.post(f"{base_url}/v1/models/{model}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "lora_weights": name}})
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "input.lora_weights"


def test_openai_edit_keeps_the_photo_size_and_makes_n_variations(oai):
    resp = oai.images.edit(model=FAST, image=("photo.png", png_bytes(PHOTO),
                                              "image/png"),
                           prompt="the product on a beach", n=3)
    images = [pixels(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))) for d in resp.data]
    assert [im.shape for im in images] == [(64, 96, 3)] * 3 and resp.size == "96x64"
    assert all(np.abs(images[i] - images[j]).mean() > 1
               for i in range(3) for j in range(i + 1, 3))


@pytest.mark.parametrize("model", [FAST, FLUX, KONTEXT])
def test_openai_edit_with_a_mask_keeps_the_unmasked_pixels(oai, model):
    mask = np.zeros((64, 96), np.uint8)
    mask[:, :40] = 255
    resp = oai.images.edit(model=model, image=("p.png", png_bytes(PHOTO)),
                           mask=("m.png", png_bytes(mask)), prompt="a new left side",
                           size="96x64", response_format="url")
    out = pixels(Image.open(io.BytesIO(httpx.get(resp.data[0].url).content)))
    diff = np.abs(out - PHOTO.astype(int))
    assert diff[:, 40:].max() == 0 and diff[:, :40].mean() > 20


def test_openai_style_transparent_masks_and_images_with_a_hole(oai):
    """As OpenAI's edits take them: a mask's transparent part is edited (here the photo
    itself with a hole), and an image with a hole and no mask is edited in the hole."""
    alpha = np.full((64, 96), 255, np.uint8)
    alpha[:, :40] = 0
    holed = png_bytes(np.dstack([PHOTO, alpha]), "RGBA")
    white = np.zeros((64, 96), np.uint8)
    white[:, :40] = 255

    def edit(image, mask=None):
        resp = oai.images.edit(model=FAST, image=("p.png", image), prompt="a new left side",
                               mask=mask or openai.NOT_GIVEN, extra_body={"seed": 12})
        return pixels(Image.open(io.BytesIO(base64.b64decode(resp.data[0].b64_json))))

    photo = png_bytes(PHOTO)
    by_white = edit(photo, ("m.png", png_bytes(white)))
    assert np.array_equal(edit(photo, ("m.png", holed)), by_white)
    in_hole = edit(holed)
    flat = PHOTO.copy()
    flat[:, :40] = 255  # the hole's pixels, flattened onto white
    assert np.array_equal(in_hole, edit(png_bytes(flat),
                                        ("m.png", png_bytes(white))))
    assert np.array_equal(in_hole[:, 40:], PHOTO[:, 40:].astype(int))
    assert np.abs(in_hole[:, :40] - by_white[:, :40]).mean() > 1  # white start, not the photo


def test_openai_edit_on_flux_at_strength_zero_returns_the_photo(oai):
    resp = oai.images.edit(model=FLUX, image=("p.png", png_bytes(PHOTO)),
                           prompt="x", extra_body={"prompt_strength": 0})
    out = Image.open(io.BytesIO(base64.b64decode(resp.data[0].b64_json)))
    assert np.array_equal(pixels(out), PHOTO.astype(int))


@pytest.mark.parametrize("model", [FAST, FLUX])
def test_openai_variations_are_prompt_free_edits_one_seed_each(oai, model):
    photo = png_bytes(PHOTO)
    resp = oai.images.create_variation(model=model, image=("p.png", photo, "image/png"), n=2,
                                       extra_body={"seed": 30})
    images = [pixels(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))) for d in resp.data]
    assert resp.size == "96x64" and [im.shape for im in images] == [(64, 96, 3)] * 2
    assert np.abs(images[0] - images[1]).mean() > 1
    # With a prompt (extra_body), a variation is the edit of the same seed.
    steered = oai.images.create_variation(model=model, image=("p.png", photo, "image/png"),
                                          extra_body={"seed": 31, "prompt": "on a beach"})
    edit = oai.images.edit(model=model, image=("p.png", photo, "image/png"),
                           prompt="on a beach", extra_body={"seed": 31})
    assert same_pixels(steered.data[0].b64_json, edit.data[0].b64_json)
    assert np.abs(pixels(Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json))))
                  - images[1]).mean() > 1  # the prompt-free one (seed 31) differs
    kept = oai.images.create_variation(model=model, image=("p.png", photo, "image/png"),
                                       extra_body={"prompt_strength": 0})
    assert np.array_equal(pixels(Image.open(io.BytesIO(base64.b64decode(kept.data[0].b64_json)))),
                          PHOTO.astype(int))


def test_a_variation_with_a_mask_is_a_400_on_mask(base_url):
    photo = ("p.png", png_bytes(PHOTO), "image/png")
    r = httpx.post(f"{base_url}/v1/images/variations", headers=AUTH,
                   files={"image": photo, "mask": photo})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"
    r = httpx.post(f"{base_url}/v1/images/variations", headers=AUTH, files={"image": photo},
                   data={"n": "0"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(f"{base_url}/v1/images/variations", headers=AUTH,
                   files=[("image", photo), ("image", photo)])
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    assert "one image" in r.json()["error"]["message"]

def _edit(base_url, files, **fields):
    return httpx.post(f"{base_url}/v1/images/edits", headers=AUTH, files=files,
                      data={"prompt": "x", **fields}, timeout=60)


def test_bad_edits_get_a_400_naming_the_field_and_the_server_keeps_serving(base_url):
    photo = ("p.png", png_bytes(PHOTO), "image/png")
    small_mask = ("m.png", png_bytes(Image.new("L", (32, 32), 255)), "image/png")
    cases = [({"image": ("p.png", b"not an image", "image/png")}, {}, "image"),
             ({}, {}, "image"),
             ({"image": photo, "mask": small_mask}, {}, "mask"),
             ({"image": photo, "mask": small_mask}, {"model": FLUX}, "mask"),
             ({"image": photo}, {"n": "0"}, "n"),
             ({"image": photo}, {"size": "large"}, "size"),
             ({"image": photo}, {"size": "4096x4096"}, "size")]
    for files, fields, param in cases:
        r = _edit(base_url, files, **fields)
        assert r.status_code == 400, (param, r.text)
        assert r.json()["error"]["param"] == param, r.text
    # Only a Kontext model reads more than one image file.
    r = _edit(base_url, [("image", photo), ("image", photo)])
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    assert "only Kontext" in r.json()["error"]["message"]
    # A given size is rounded down to multiples of 8, as the image's own size would be.
    assert _edit(base_url, {"image": photo}, size="100x100").json()["size"] == "96x96"


def test_edit_forms_the_parser_refuses_get_openais_400_and_the_server_keeps_serving(
        base_url):
    photo = ("p.png", png_bytes(PHOTO), "image/png")
    misframed = post_misframed(f"{base_url}/v1/images/edits", {"image": photo}, prompt="x")
    overfull = _edit(base_url, [("image", photo)] * (MOST_REFERENCES + 2))
    for r, reason in ((misframed, "Invalid multipart data"), (overfull, "Too many files")):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request")
        assert "not a valid multipart/form-data body" in error["message"]
        assert reason in error["message"]
    assert _edit(base_url, {"image": photo}).json()["size"] == "96x64"


def test_bodies_over_the_limit_get_413_before_they_are_read(base_url, oai):
    big = "A" * (MAX_BODY_BYTES + 1)
    r = httpx.post(f"{base_url}/generate", headers=AUTH, json={"prompt": "x", "image": big})
    assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body", "body"]
    assert r.headers["x-atelier-ingress"]  # answered, and counted, as any other
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "image": big}})
    assert r.status_code == 413 and r.json()["invalid_fields"][0]["field"] == "body"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(3):
            yield b"B" * MAX_BODY_BYTES

    r = httpx.post(f"{base_url}/v1/images/generations", headers=AUTH, content=chunks())
    assert r.status_code == 413 and r.json()["error"]["param"] == "body", r.text
    assert r.headers["x-atelier-ingress"]
    with pytest.raises(openai.APIStatusError) as err:
        oai.images.edit(model=FAST, image=("p.png", b"\x89PNG" + big.encode()), prompt="x")
    assert err.value.status_code == 413
    assert httpx.get(f"{base_url}/healthz").status_code == 200
