"""ControlNets through `/generate` and Replicate's API on the running app: the control
image steers the image, the canny ControlNet draws from a picture's edges, the
ControlNet's own scale is the default, several combine, img2img takes them, Replicate's
multi-ControlNet inputs give `/generate`'s pixels, and bad ControlNet fields are 422s
naming them."""

import base64
import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import BATCHED, FAST, REDUX, assert_same_pixels, decode, pixels
from tests.pictures import scene

PICTURE = scene()
EDGES = Image.fromarray(cv2.Canny(np.asarray(PICTURE.convert("L")), 100, 200)).convert("RGB")


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _generate(client, **fields):
    body = {"model": FAST, "prompt": "a product shot", "steps": 4, "seed": 21, **fields}
    body = {name: value for name, value in body.items() if value is not None}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_control_image_steers_the_image_and_sets_its_size(client):
    plain = _generate(client, width=96, height=64)
    off = _generate(client, control_image=_b64(PICTURE), controlnet_conditioning_scale=0)
    on = _generate(client, control_image=_b64(PICTURE))
    assert (on["width"], on["height"]) == (96, 64) == decode(on["image"]).size
    assert_same_pixels(decode(off["image"]), decode(plain["image"]))
    assert np.abs(pixels(decode(on["image"])) - pixels(decode(plain["image"]))).mean() > 3
    sized = _generate(client, control_image=_b64(PICTURE), width=64, height=64)
    assert decode(sized["image"]).size == (64, 64)


def test_the_canny_controlnet_draws_from_the_pictures_edges(client):
    # "canny" and "lines" have the same weights; only canny preprocesses its input.
    from_picture = _generate(client, control_image=_b64(PICTURE), controlnet="canny",
                             controlnet_conditioning_scale=1.0)
    from_edges = _generate(client, control_image=_b64(EDGES), controlnet="lines",
                           controlnet_conditioning_scale=1.0)
    assert_same_pixels(decode(from_picture["image"]), decode(from_edges["image"]))
    unprocessed = _generate(client, control_image=_b64(PICTURE), controlnet="lines",
                            controlnet_conditioning_scale=1.0)
    assert np.abs(pixels(decode(unprocessed["image"]))
                  - pixels(decode(from_edges["image"]))).mean() > 0.5
    # The request's thresholds find the edges: the same pixels as those edges sent as is.
    grey = np.asarray(PICTURE.convert("L"))
    strong = Image.fromarray(cv2.Canny(grey, 450, 500)).convert("RGB")
    assert 0 < np.asarray(strong).sum() < np.asarray(EDGES).sum()  # fewer edges than 100/200
    from_strong = _generate(client, control_image=_b64(PICTURE), controlnet="canny",
                            controlnet_conditioning_scale=1.0, canny_low_threshold=450,
                            canny_high_threshold=500)
    assert_same_pixels(decode(from_strong["image"]), decode(_generate(
        client, control_image=_b64(strong), controlnet="lines",
        controlnet_conditioning_scale=1.0)["image"]))


def test_the_controlnets_own_scale_is_the_default(client):
    default = _generate(client, control_image=_b64(EDGES), controlnet="lines")
    half = _generate(client, control_image=_b64(EDGES), controlnet="lines",
                     controlnet_conditioning_scale=0.5)
    full = _generate(client, control_image=_b64(EDGES), controlnet="lines",
                     controlnet_conditioning_scale=1.0)
    assert_same_pixels(decode(default["image"]), decode(half["image"]))
    assert np.abs(pixels(decode(default["image"])) - pixels(decode(full["image"]))).mean() > 1


def test_the_model_list_names_the_controlnets(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models[FAST]["controlnets"] == {
        "canny": {"conditioning_scale": 1.0, "preprocess": "canny", "control_mode": None},
        "lines": {"conditioning_scale": 0.5, "preprocess": "none", "control_mode": None}}


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"controlnet": "depth"}, "controlnet", "canny, lines"),
    ({"model": REDUX}, "control_image", "no ControlNet"),
    ({"control_image": "bm90IGFuIGltYWdl"}, "control_image", "cannot be decoded"),
    ({"controlnets": [{"image": _b64(EDGES)}]}, "controlnets", "not both"),
    ({"control_guidance_start": 0.6, "control_guidance_end": 0.4}, "control_guidance_start",
     "below their end"),
    ({"controlnet_conditioning_scale": 5}, "controlnet_conditioning_scale", "4"),
    ({"control_image": None, "controlnet": "canny"}, "control_image", "needs"),
    ({"control_image": None, "controlnets": [{"image": "not read"}] * 4},
     "controlnets.3.name", "at most 3"),
])
def test_bad_controlnet_fields_are_422s_naming_them(client, fields, field, words):
    body = {"model": FAST, "prompt": "x", "steps": 2, "control_image": _b64(PICTURE), **fields}
    if body["control_image"] is None:
        del body["control_image"]
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", field] and words in error["msg"], error


def test_two_controlnets_combine_and_scale_zero_leaves_one(client):
    both = [{"name": "lines", "image": _b64(EDGES), "conditioning_scale": 1.0},
            {"name": "canny", "image": _b64(PICTURE), "conditioning_scale": 0.0}]
    one = _generate(client, controlnets=both)
    alone = _generate(client, control_image=_b64(EDGES), controlnet="lines",
                      controlnet_conditioning_scale=1.0)
    assert_same_pixels(decode(one["image"]), decode(alone["image"]))
    both[1]["conditioning_scale"] = 1.0
    combined = _generate(client, controlnets=both)
    assert np.abs(pixels(decode(combined["image"]))
                  - pixels(decode(alone["image"]))).mean() > 0.5
    r = client.post("/generate", json={"model": FAST, "prompt": "x", "controlnets": [
        {"name": "lines", "image": _b64(EDGES)}, {"name": "depth", "image": _b64(EDGES)}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body",
                                                                       "controlnets.1.name"]


def test_img2img_follows_a_control_image_of_the_inputs_size(client):
    photo = np.random.default_rng(8).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    fields = {"image": _b64(Image.fromarray(photo)), "prompt_strength": 0.7}
    plain = _generate(client, **fields)
    steered = _generate(client, **fields, control_image=_b64(EDGES.resize((48, 32))),
                        controlnet="lines")
    assert decode(steered["image"]).size == (96, 64)
    assert np.abs(pixels(decode(steered["image"])) - pixels(decode(plain["image"]))).mean() > 1


def _replicated(rep, **fields):
    (file,) = rep.run(FAST, input={"prompt": "a product shot", "num_inference_steps": 4,
                                   "seed": 21, **fields})
    return Image.open(io.BytesIO(file.read()))


def test_replicates_multi_controlnet_inputs_give_generates_pixels(rep, client):
    """fofr/sdxl-multi-controlnet-lora's inputs, as its clients send them: a data URI,
    and a file the client uploads first."""
    edges_url = "data:image/png;base64," + _b64(EDGES)
    image = _replicated(rep, controlnet_1="lines", controlnet_1_image=edges_url,
                        controlnet_1_conditioning_scale=0.8, controlnet_2="canny",
                        controlnet_2_image=io.BytesIO(base64.b64decode(_b64(EDGES))),
                        controlnet_2_conditioning_scale=0.3,
                        controlnet_2_end=0.5, controlnet_3="none",
                        sizing_strategy="controlnet_1_image")
    direct = _generate(client, controlnets=[
        {"name": "lines", "image": _b64(EDGES), "conditioning_scale": 0.8},
        {"name": "canny", "image": _b64(EDGES), "conditioning_scale": 0.3, "end": 0.5}])
    assert image.size == (96, 64)
    assert_same_pixels(image, decode(direct["image"]))
    sized = _replicated(rep, controlnet_1="lines", controlnet_1_image=edges_url, width=64,
                        height=128)
    assert sized.size == (64, 128)


def test_the_canny_thresholds_of_replicate_and_openai_find_generates_edges(rep, oai, client):
    """An Atelier extension of both APIs' inputs: the same pixels as /generate's with the
    same thresholds, other pixels than with the ControlNets' defaults."""
    nets = [{"name": "canny", "image": _b64(PICTURE), "conditioning_scale": 1.0}]
    strong = {"canny_low_threshold": 450, "canny_high_threshold": 500}
    direct = decode(_generate(client, controlnets=nets, **strong)["image"])
    default = decode(_generate(client, controlnets=nets)["image"])
    assert np.abs(pixels(direct) - pixels(default)).mean() > 0.2  # 0.41 when written
    replicated = _replicated(rep, controlnet_1="canny",
                             controlnet_1_image="data:image/png;base64," + _b64(PICTURE),
                             controlnet_1_conditioning_scale=1.0,
                             sizing_strategy="controlnet_1_image", **strong)
    assert_same_pixels(replicated, direct)
    # The OpenAI API takes the model's default steps.
    made = oai.images.generate(model=FAST, prompt="a product shot",
                               extra_body={"seed": 21, "controlnets": nets, **strong})
    assert_same_pixels(Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json))),
                       decode(_generate(client, controlnets=nets, steps=None, **strong)["image"]))
    r = client.post("/v1/images/generations", json={
        "model": FAST, "prompt": "x", "controlnets": nets, "canny_low_threshold": 501})
    assert r.status_code == 400 and r.json()["error"]["param"] == "canny_low_threshold", r.text


def test_replicates_sizing_strategy_needs_what_it_names(rep):
    import replicate

    for fields in ({"sizing_strategy": "controlnet_2_image", "controlnet_1": "lines",
                    "controlnet_1_image": "data:image/png;base64," + _b64(EDGES)},
                   {"sizing_strategy": "input_image"}):
        with pytest.raises(replicate.exceptions.ReplicateError) as err:
            _replicated(rep, **fields)
        assert err.value.status == 422 and "sizing_strategy" in str(err.value)


def test_only_models_with_controlnets_show_replicates_controlnet_inputs(rep):
    def inputs(model):
        version = rep.models.get(model).latest_version
        return version.openapi_schema["components"]["schemas"]["Input"]["properties"]

    assert {"controlnet_1", "controlnet_3_end", "sizing_strategy",
            "canny_low_threshold", "canny_high_threshold"} <= set(inputs(FAST))
    assert "prompt" in inputs(BATCHED) and not any(
        "controlnet" in name or name in ("sizing_strategy", "canny_low_threshold")
        for name in inputs(BATCHED))


def test_a_lora_and_a_controlnet_steer_one_image_together(client):
    fields = {"control_image": _b64(EDGES), "controlnet": "lines"}
    steered = _generate(client, **fields)
    styled = _generate(client, **fields, loras=[{"name": "sketch", "scale": 1.0}])
    tagged = _generate(client, **fields, prompt="a product shot <lora:sketch:1.0>")
    assert np.abs(pixels(decode(styled["image"])) - pixels(decode(steered["image"]))).mean() > 1
    assert_same_pixels(decode(styled["image"]), decode(tagged["image"]))


def test_the_openai_client_sends_controlnets_with_extra_body(oai, client):
    nets = [{"name": "lines", "image": _b64(EDGES), "conditioning_scale": 0.8}]
    made = oai.images.generate(model=FAST, prompt="a product shot",
                               extra_body={"seed": 21, "controlnets": nets})
    direct = _generate(client, controlnets=nets, steps=None)
    image = Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json)))
    assert image.size == (96, 64) and made.size == "96x64"
    assert_same_pixels(image, decode(direct["image"]))
    # An edit's form carries the list as JSON.
    photo = np.random.default_rng(8).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    png = base64.b64decode(_b64(Image.fromarray(photo)))
    edited = oai.images.edit(model=FAST, image=("p.png", png, "image/png"),
                             prompt="a product shot", extra_body={
                                 "seed": 21, "prompt_strength": 0.7,
                                 "controlnets": json.dumps(nets)})
    direct = _generate(client, controlnets=nets, steps=None, image=_b64(Image.fromarray(photo)),
                       prompt_strength=0.7)
    assert_same_pixels(Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))),
                       decode(direct["image"]))
