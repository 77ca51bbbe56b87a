"""Image prompts (IP-Adapter) through `/generate`, Replicate's and OpenAI's APIs with their
official clients, on the running app: the image prompt steers the image and keeps its
size, the adapter's own scale is the default, requests with and without one share a call
and keep their own pixels, the three APIs give the same pixels (on SDXL, and on FLUX with
XLabs' adapter), models list their adapter and only models with one show Replicate's
inputs for it, and bad fields are refused in each API's shape, naming them."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import (
    API_KEY,
    BATCHED,
    FAST,
    FLUX,
    REDUX,
    TWO_REPLICAS,
    assert_same_pixels,
    decode,
    noise,
    pixels,
    post_many,
)


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


STYLE, OTHER = _b64(noise(1, (80, 120))), _b64(noise(2, (200, 90)))


def _generate(client, **fields):
    body = {"model": FAST, "prompt": "a product shot", "steps": 4, "seed": 31, "width": 64,
            "height": 64, **fields}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return decode(r.json()["image"])


def test_the_image_prompt_steers_the_image_at_the_adapters_scale_by_default(client):
    plain = _generate(client)
    styled = _generate(client, ip_adapter_image=STYLE)
    other = _generate(client, ip_adapter_image=OTHER)
    assert styled.size == plain.size == (64, 64)  # the picture's own size does not count
    assert np.abs(pixels(styled) - pixels(plain)).mean() > 2
    assert np.abs(pixels(styled) - pixels(other)).mean() > 0.3
    assert_same_pixels(_generate(client, ip_adapter_image=STYLE, ip_adapter_scale=0), plain)
    # The model's config sets the adapter's scale to 0.8.
    assert_same_pixels(_generate(client, ip_adapter_image=STYLE, ip_adapter_scale=0.8),
                       styled)
    weaker = _generate(client, ip_adapter_image=STYLE, ip_adapter_scale=0.3)
    assert 0 < np.abs(pixels(weaker) - pixels(plain)).mean() < np.abs(
        pixels(styled) - pixels(plain)).mean()


def test_a_lora_and_an_image_prompt_steer_one_image_together(client):
    styled = _generate(client, ip_adapter_image=STYLE)
    both = _generate(client, ip_adapter_image=STYLE, loras=[{"name": "sketch", "scale": 1.0}])
    tagged = _generate(client, ip_adapter_image=STYLE, prompt="a product shot <lora:sketch:1.0>")
    lora_only = _generate(client, loras=[{"name": "sketch", "scale": 1.0}])
    assert np.abs(pixels(both) - pixels(styled)).mean() > 1
    assert np.abs(pixels(both) - pixels(lora_only)).mean() > 1
    assert_same_pixels(both, tagged)


def test_requests_with_and_without_an_image_prompt_share_a_call(base_url, client):
    bodies = [{"model": BATCHED, "prompt": "a chair", "seed": 40 + i, **extra}
              for i, extra in enumerate([{"ip_adapter_image": STYLE}, {},
                                         {"ip_adapter_image": OTHER, "ip_adapter_scale": 1.5}])]
    alone = [client.post("/generate", json=body) for body in bodies]
    crowd = post_many(base_url, bodies)
    assert [r.status_code for r in crowd] == [200] * 3
    assert len({r.headers["x-atelier-batch-id"] for r in crowd}) == 1
    assert [r.headers["x-atelier-batch-requests"] for r in crowd] == ["3"] * 3
    for own, shared in zip(alone, crowd, strict=True):
        assert_same_pixels(decode(own.json()["image"]), decode(shared.json()["image"]))


def test_replicate_and_openai_clients_send_image_prompts_with_generates_pixels(
        rep, base_url, client):
    import openai

    direct = _generate(client, ip_adapter_image=STYLE, ip_adapter_scale=1.2)
    (file,) = rep.run(FAST, input={
        "prompt": "a product shot", "num_inference_steps": 4, "seed": 31, "width": 64,
        "height": 64, "ip_adapter_image": io.BytesIO(base64.b64decode(STYLE)),
        "ip_adapter_scale": 1.2})
    assert_same_pixels(Image.open(io.BytesIO(file.read())), direct)
    oai = openai.OpenAI(api_key=API_KEY, base_url=f"{base_url}/v1", max_retries=0)
    made = oai.images.generate(model=FAST, prompt="a product shot", size="64x64", extra_body={
        "seed": 31, "ip_adapter_image": "data:image/png;base64," + STYLE,
        "ip_adapter_scale": 1.2})
    image = Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json)))
    # OpenAI's route runs the model's default steps: compare with /generate's at those.
    assert_same_pixels(image, _generate(client, ip_adapter_image=STYLE, ip_adapter_scale=1.2,
                                        steps=None))


def test_models_list_their_ip_adapter_and_replicate_shows_its_inputs_where_there_is_one(
        client, rep):
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    blocks = ["all", "style", "layout", "style_and_layout"]
    assert listed[FAST]["ip_adapter"] == {"scale": 0.8, "extra": {}, "pictures": 4,
                                          "masks": True, "blocks": blocks}
    assert listed[TWO_REPLICAS]["ip_adapter"] is None

    def inputs(model):
        version = rep.models.get(model).latest_version
        return version.openapi_schema["components"]["schemas"]["Input"]["properties"]

    assert {"ip_adapter_image", "ip_adapter_scale"} <= set(inputs(FAST))
    assert "extra_ip_adapters" not in inputs(FAST)  # it has no further adapters
    assert "prompt" in inputs(TWO_REPLICAS) and "ip_adapter_image" not in inputs(TWO_REPLICAS)


def test_a_further_adapter_takes_its_own_image_prompt_in_every_api(client, rep, oai):
    """BATCHED's `face` adapter (a plus one, beside its first): with the first's prompt it
    moves the image; alone it works too; its default scale is the config's; the three
    APIs give the same pixels; names it does not hold are refused naming the field."""
    face = {"face": {"image": "data:image/png;base64," + OTHER}}
    common = {"model": BATCHED, "prompt": "a product shot", "steps": 3, "seed": 8}

    def draw(**fields):
        r = client.post("/generate", json=common | fields)
        assert r.status_code == 200, r.text
        return decode(r.json()["image"])

    both, first = draw(ip_adapter_image=STYLE, extra_ip_adapters=face), draw(
        ip_adapter_image=STYLE)
    assert np.abs(pixels(both) - pixels(first)).mean() > 1
    alone, plain = draw(extra_ip_adapters=face), draw()
    assert np.abs(pixels(alone) - pixels(plain)).mean() > 1
    assert_same_pixels(draw(ip_adapter_image=STYLE, extra_ip_adapters={"face": {
        "image": face["face"]["image"], "scale": 0.7}}), both)  # the config's scale
    (file,) = rep.run(BATCHED, input={
        "prompt": "a product shot", "num_inference_steps": 3, "seed": 8,
        "ip_adapter_image": "data:image/png;base64," + STYLE, "extra_ip_adapters": face})
    assert_same_pixels(Image.open(io.BytesIO(file.read())), both)
    made = oai.images.generate(model=BATCHED, prompt="a product shot", size="64x64",
                               extra_body={"seed": 8, "num_inference_steps": 3,
                                           "ip_adapter_image": "data:image/png;base64," + STYLE,
                                           "extra_ip_adapters": face})
    assert_same_pixels(Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json))), both)
    for model, says in ((BATCHED, "(face)"), (FAST, "(it has none)")):
        r = client.post("/generate", json=common | {"model": model, "extra_ip_adapters": {
            "style": face["face"]}})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", "extra_ip_adapters"] and says in detail["msg"]
    r = client.post(f"/v1/models/{BATCHED}/predictions", json={"input": {
        "prompt": "x", "extra_ip_adapters": {"face": {"scale": 0.5}}}})
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"].startswith("input.extra_ip_adapters")
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed[BATCHED]["ip_adapter"]["extra"] == {"face": {"scale": 0.7}}
    assert listed[BATCHED]["ip_adapter"]["scale"] == 0.6
    schema = client.get(f"/v1/models/{BATCHED}").json()["latest_version"]["openapi_schema"]
    assert "extra_ip_adapters" in schema["components"]["schemas"]["Input"]["properties"]


def test_a_mood_board_steers_as_one_image_prompt_in_every_api(base_url, client, rep, oai):
    """A board of two pictures: another image than either alone; the same pixels from
    /generate, Replicate's client (a list of files) and OpenAI's (extra_body); in a call
    with a single picture and none, each keeps its own pixels; five pictures and a bad
    second one are refused naming the field."""
    board = [STYLE, OTHER]
    mood = _generate(client, ip_adapter_image=board)
    for picture in board:
        assert np.abs(pixels(_generate(client, ip_adapter_image=picture)) - pixels(mood)
                      ).mean() > 0.3
    (file,) = rep.run(FAST, input={
        "prompt": "a product shot", "num_inference_steps": 4, "seed": 31, "width": 64,
        "height": 64, "ip_adapter_image": [io.BytesIO(base64.b64decode(p)) for p in board]})
    assert_same_pixels(Image.open(io.BytesIO(file.read())), mood)
    made = oai.images.generate(model=FAST, prompt="a product shot", size="64x64", extra_body={
        "seed": 31, "ip_adapter_image": ["data:image/png;base64," + p for p in board]})
    assert_same_pixels(Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json))),
                       _generate(client, ip_adapter_image=board, steps=None))
    # An edit's form carries the board as JSON text.
    photo = base64.b64decode(_b64(noise(5, (64, 64))))
    edited = oai.images.edit(model=FAST, image=("p.png", photo, "image/png"),
                             prompt="a product shot", extra_body={
                                 "seed": 31, "prompt_strength": 0.7,
                                 "ip_adapter_image": json.dumps(board)})
    assert_same_pixels(decode(edited.data[0].b64_json), _generate(
        client, ip_adapter_image=board, steps=None, image=base64.b64encode(photo).decode(),
        prompt_strength=0.7))
    bodies = [{"model": BATCHED, "prompt": "a chair", "seed": 50 + i, **extra}
              for i, extra in enumerate([{"ip_adapter_image": board}, {},
                                         {"ip_adapter_image": OTHER}])]
    alone = [client.post("/generate", json=body) for body in bodies]
    crowd = post_many(base_url, bodies)
    assert len({r.headers["x-atelier-batch-id"] for r in crowd}) == 1
    for own, shared in zip(alone, crowd, strict=True):
        assert_same_pixels(decode(own.json()["image"]), decode(shared.json()["image"]))
    for pictures, field, says in (([STYLE] * 5, "ip_adapter_image", "not 5"),
                                  ([STYLE, "bm90IGFuIGltYWdl"], "ip_adapter_image.1", "")):
        r = client.post("/generate", json={"model": FAST, "prompt": "x",
                                           "ip_adapter_image": pictures})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", field] and says in detail["msg"], detail


def test_bad_image_prompts_are_refused_naming_the_field(client, rep, base_url):
    import openai
    import replicate

    cases = [({"model": TWO_REPLICAS, "ip_adapter_image": STYLE}, "ip_adapter_image",
              "no IP-Adapter"),
             ({"model": REDUX, "ip_adapter_image": STYLE}, "ip_adapter_image",
              "reads its image prompt from redux_image"),
             ({"ip_adapter_image": "bm90IGFuIGltYWdl"}, "ip_adapter_image", ""),
             ({"ip_adapter_image": "http://elsewhere.example/a.png"}, "ip_adapter_image",
              "image_allowed_hosts"),
             ({"ip_adapter_image": STYLE, "ip_adapter_scale": 3}, "ip_adapter_scale", "")]
    for fields, field, says in cases:
        r = client.post("/generate", json={"model": FAST, "prompt": "x", **fields})
        assert r.status_code == 422, (fields, r.text)
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", field] and says in detail["msg"]
    with pytest.raises(replicate.exceptions.ReplicateError) as err:
        rep.run(TWO_REPLICAS, input={"prompt": "x", "ip_adapter_image": "data:image/png;"
                                                                       "base64," + STYLE})
    assert err.value.status == 422 and "input.ip_adapter_image" in str(err.value)
    oai = openai.OpenAI(api_key=API_KEY, base_url=f"{base_url}/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        oai.images.generate(model=TWO_REPLICAS, prompt="x",
                            extra_body={"ip_adapter_image": STYLE})
    assert bad.value.body["param"] == "ip_adapter_image"


def test_a_flux_model_with_xlabs_adapter_takes_image_prompts_from_all_three_apis(
        client, rep, base_url):
    """FLUX's defaults: 64x64, 4 steps, guidance 3; Replicate's flux-dev input names the
    same fields as the SDXL models', and only the FLUX model with the adapter shows them."""
    import openai

    def flux(**fields):
        return _generate(client, model=FLUX, steps=None, width=None, height=None, **fields)

    plain, styled = flux(), flux(ip_adapter_image=STYLE)
    assert styled.size == (64, 64) and np.abs(pixels(styled) - pixels(plain)).mean() > 2
    assert np.abs(pixels(flux(ip_adapter_image=OTHER)) - pixels(styled)).mean() > 0.3
    assert_same_pixels(flux(ip_adapter_image=STYLE, ip_adapter_scale=0), plain)
    # The adapter's own scale (0.6) is the default.
    assert_same_pixels(flux(ip_adapter_image=STYLE, ip_adapter_scale=0.6), styled)
    (file,) = rep.run("black-forest-labs/flux-dev", input={
        "prompt": "a product shot", "seed": 31, "output_format": "png",
        "ip_adapter_image": io.BytesIO(base64.b64decode(STYLE)), "ip_adapter_scale": 0.6})
    assert_same_pixels(Image.open(io.BytesIO(file.read())), styled)
    oai = openai.OpenAI(api_key=API_KEY, base_url=f"{base_url}/v1", max_retries=0)
    made = oai.images.generate(model=FLUX, prompt="a product shot", size="64x64", extra_body={
        "seed": 31, "ip_adapter_image": "data:image/png;base64," + STYLE})
    assert_same_pixels(decode(made.data[0].b64_json), styled)

    def inputs(model):
        version = rep.models.get(model).latest_version
        return version.openapi_schema["components"]["schemas"]["Input"]["properties"]

    assert {"ip_adapter_image", "ip_adapter_scale"} <= set(inputs(FLUX))
    assert "redux_image" not in inputs(FLUX)
    assert "redux_image" in inputs(REDUX) and "ip_adapter_image" not in inputs(REDUX)
    for sdxl_only in ("ip_adapter_mask", "ip_adapter_blocks"):
        assert sdxl_only not in inputs(FLUX) and sdxl_only in inputs(FAST)


def test_a_masked_image_prompt_steers_its_part_in_every_api(client, rep, oai):
    """ip_adapter_mask: the picture steers the mask's white half only (another image than
    unmasked and than plain; a black mask gives the plain one), the same from the three
    APIs; a FLUX model's, and one with a mood board, are refused naming the field."""
    half = Image.new("L", (64, 64))
    half.paste(255, (0, 0, 32, 64))
    mask = _b64(half)
    masked = _generate(client, ip_adapter_image=STYLE, ip_adapter_mask=mask)
    plain, unmasked = _generate(client), _generate(client, ip_adapter_image=STYLE)
    assert np.abs(pixels(masked) - pixels(plain)).mean() > 0.3
    assert np.abs(pixels(masked) - pixels(unmasked)).mean() > 0.3
    assert_same_pixels(_generate(client, ip_adapter_image=STYLE,
                                 ip_adapter_mask=_b64(Image.new("L", (64, 64)))), plain)
    (file,) = rep.run(FAST, input={
        "prompt": "a product shot", "num_inference_steps": 4, "seed": 31, "width": 64,
        "height": 64, "ip_adapter_image": io.BytesIO(base64.b64decode(STYLE)),
        "ip_adapter_mask": io.BytesIO(base64.b64decode(mask))})
    assert_same_pixels(Image.open(io.BytesIO(file.read())), masked)
    made = oai.images.generate(model=FAST, prompt="a product shot", size="64x64", extra_body={
        "seed": 31, "ip_adapter_image": "data:image/png;base64," + STYLE,
        "ip_adapter_mask": "data:image/png;base64," + mask})
    assert_same_pixels(decode(made.data[0].b64_json),
                       _generate(client, ip_adapter_image=STYLE, ip_adapter_mask=mask, steps=None))
    for fields, field in (({"model": FLUX, "ip_adapter_image": STYLE, "ip_adapter_mask": mask},
                           "ip_adapter_mask"),
                          ({"ip_adapter_image": [STYLE, OTHER], "ip_adapter_mask": mask},
                           "ip_adapter_image")):
        r = client.post("/generate", json={"model": FAST, "prompt": "x", **fields})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", field], r.text


def test_an_image_prompt_steering_the_style_block_alone_in_every_api(client, rep, oai):
    """ip_adapter_blocks: the style block alone gives another image than every block (and
    than none), the same from the three APIs; a FLUX model refuses it naming the field."""
    style = _generate(client, ip_adapter_image=STYLE, ip_adapter_blocks="style")
    every, plain = _generate(client, ip_adapter_image=STYLE), _generate(client)
    assert np.abs(pixels(style) - pixels(every)).mean() > 0.3
    assert np.abs(pixels(style) - pixels(plain)).mean() > 0
    (file,) = rep.run(FAST, input={
        "prompt": "a product shot", "num_inference_steps": 4, "seed": 31, "width": 64,
        "height": 64, "ip_adapter_image": io.BytesIO(base64.b64decode(STYLE)),
        "ip_adapter_blocks": "style"})
    assert_same_pixels(Image.open(io.BytesIO(file.read())), style)
    made = oai.images.generate(model=FAST, prompt="a product shot", size="64x64", extra_body={
        "seed": 31, "ip_adapter_image": "data:image/png;base64," + STYLE,
        "ip_adapter_blocks": "style"})
    assert_same_pixels(decode(made.data[0].b64_json), _generate(
        client, ip_adapter_image=STYLE, ip_adapter_blocks="style", steps=None))
    r = client.post("/generate", json={"model": FLUX, "prompt": "x", "ip_adapter_image": STYLE,
                                       "ip_adapter_blocks": "layout"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body",
                                                                    "ip_adapter_blocks"]
