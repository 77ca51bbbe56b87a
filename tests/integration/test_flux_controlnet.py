"""ControlNets on a FLUX model, through `/generate`, Replicate's and OpenAI's APIs on the
running app: `atelier/tiny-flux` (fused projections, FP8 layers, merged adapters) has the
tiny union ControlNet under four names, `canny` (mode 0, finding a picture's edges),
`edges` (mode 0, reading edges as sent), `depth` (mode 2, estimating a picture's depth
map with the tiny Depth Anything) and `depth-map` (mode 2, reading depth maps as sent)."""

import base64
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import FLUX, REDUX, assert_same_pixels, decode, pixels
from tests.pictures import scene

PICTURE = scene(flip=True)
EDGES = Image.fromarray(cv2.Canny(np.asarray(PICTURE.convert("L")), 100, 200)).convert("RGB")


def _uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _generate(client, **fields) -> Image.Image:
    body = {"model": FLUX, "prompt": "a lamp on a desk", "steps": 4, "seed": 31, **fields}
    r = client.post("/generate", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 200, r.text
    return decode(r.json()["image"])


def test_a_control_image_steers_a_flux_image_and_sets_its_size(client):
    steered = _generate(client, control_image=_uri(EDGES), controlnet="edges")
    unsteered = _generate(client, control_image=_uri(EDGES), controlnet="edges",
                          controlnet_conditioning_scale=0)
    plain = _generate(client)
    assert steered.size == (96, 64) and plain.size == (64, 64)  # the model's default size
    assert np.abs(pixels(steered) - pixels(unsteered)).mean() > 3
    upside_down = EDGES.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    other = _generate(client, control_image=_uri(upside_down), controlnet="edges")
    assert np.abs(pixels(steered) - pixels(other)).mean() > 1


def test_each_name_serves_its_mode_and_preprocesses_the_picture_first(client, cache_dir):
    import torch

    from deployments.engines.depth import DepthMaps
    from deployments.tiny import TINY_DEPTH_ANYTHING, ensure_embedded

    from_picture = _generate(client, control_image=_uri(PICTURE), controlnet="canny")
    from_edges = _generate(client, control_image=_uri(EDGES), controlnet="edges")
    assert_same_pixels(from_picture, from_edges)
    as_depth = _generate(client, control_image=_uri(EDGES), controlnet="depth-map")
    assert not np.array_equal(pixels(as_depth), pixels(from_edges))
    # The replica estimates the picture's depth map: the pixels of that map sent as is.
    estimator = DepthMaps(ensure_embedded(TINY_DEPTH_ANYTHING, cache_dir), torch.float32,
                          torch.device("cpu"))
    depth_map = estimator.of(PICTURE)
    assert_same_pixels(_generate(client, control_image=_uri(PICTURE), controlnet="depth"),
                       _generate(client, control_image=_uri(depth_map), controlnet="depth-map"))


def test_the_model_list_gives_each_controlnets_mode(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models[FLUX]["controlnets"] == {
        "canny": {"conditioning_scale": 1.0, "preprocess": "canny", "control_mode": 0},
        "edges": {"conditioning_scale": 1.0, "preprocess": "none", "control_mode": 0},
        "depth": {"conditioning_scale": 0.8, "preprocess": "depth", "control_mode": 2},
        "depth-map": {"conditioning_scale": 0.8, "preprocess": "none", "control_mode": 2}}
    assert models[REDUX]["controlnets"] == {}


def test_replicates_flux_controlnet_inputs_give_generates_pixels(rep, client):
    """xlabs-ai/flux-dev-controlnet's inputs, as its clients send them."""
    (file,) = rep.run(FLUX, input={"prompt": "a lamp on a desk", "num_inference_steps": 4,
                                   "seed": 31, "control_image": _uri(EDGES),
                                   "control_type": "edges", "control_strength": 0.7,
                                   "output_format": "png"})
    image = Image.open(io.BytesIO(file.read()))
    direct = _generate(client, control_image=_uri(EDGES), controlnet="edges",
                       controlnet_conditioning_scale=0.7)
    assert image.size == (96, 64)
    assert_same_pixels(image, direct)
    # aspect_ratio sizes the output instead: 512x512, over this model's limits.
    import replicate

    with pytest.raises(replicate.exceptions.ReplicateError) as err:
        rep.run(FLUX, input={"prompt": "a lamp on a desk", "control_image": _uri(EDGES),
                             "aspect_ratio": "1:1", "megapixels": "0.25"})
    assert err.value.status == 422 and "input.aspect_ratio" in str(err.value)
    assert "got 262144" in str(err.value)


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"control_type": "pose"}, "input.control_type", "canny, edges, depth, depth-map"),
    ({"control_image": "bm90IGFuIGltYWdl"}, "input.control_image", "cannot be decoded"),
    ({"control_strength": 5}, "input.control_strength", "4"),
])
def test_bad_flux_controlnet_inputs_are_422s_naming_them(rep, fields, field, words):
    import replicate

    inputs = {"prompt": "x", "num_inference_steps": 2, "control_image": _uri(EDGES), **fields}
    with pytest.raises(replicate.exceptions.ReplicateError) as err:
        rep.run(FLUX, input=inputs)
    assert err.value.status == 422 and field in str(err.value) and words in str(err.value)


def test_a_flux_model_without_controlnets_refuses_a_control_image(rep, client):
    r = client.post("/generate", json={"model": REDUX, "prompt": "x", "steps": 2,
                                       "control_image": _uri(EDGES)})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "control_image"]
    assert "no ControlNet" in r.json()["detail"][0]["msg"]

    def inputs(model):
        version = rep.models.get(model).latest_version
        return version.openapi_schema["components"]["schemas"]["Input"]["properties"]

    assert {"control_image", "control_type", "control_strength"} <= set(inputs(FLUX))
    assert "prompt" in inputs(REDUX) and not any("control" in name for name in inputs(REDUX))


def test_the_openai_client_sends_flux_controlnets_with_extra_body(oai, client):
    nets = [{"name": "edges", "image": _uri(EDGES), "conditioning_scale": 0.9},
            {"name": "depth", "image": _uri(PICTURE), "end": 0.5}]
    made = oai.images.generate(model=FLUX, prompt="a lamp on a desk",
                               extra_body={"seed": 31, "controlnets": nets})
    image = Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json)))
    assert made.size == "96x64"
    assert_same_pixels(image, _generate(client, controlnets=nets, steps=None))
