"""FLUX.1 Depth on the embedded tiny Depth and tiny Depth Anything (CPU): the tiny FLUX's
configs with a 128-channel input, saved as a FluxControlPipeline folder, and a random
Depth Anything saved in transformers' layout. A request's picture is sent as it is; the
replica estimates its depth map (the estimator's output at the picture's size, stretched
to 0-255), and the pixels are diffusers' FluxControlPipeline's for that map, alone or
batched. The config ties `depth` to its weights and estimator."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from serve.config import ConfigError, ModelConfig, parse_config
from serve.errors import InvalidField
from serve.source_images import source_image
from serve.types import GenerationRequest
from tests.pictures import png_bytes, scene
from tests.unit.test_engine import assert_same_pixels

MODEL = ModelConfig(id="a/depth", family="flux", embedded="tiny-flux-depth", depth=True,
                    depth_estimator={"embedded": "tiny-depth-anything"}, dtype="float32",
                    defaults={"width": 96, "height": 96, "num_inference_steps": 4,
                              "guidance_scale": 10})


SCENE = scene()


@pytest.fixture(scope="module")
def paths(cache_dir):
    from deployments.tiny import TINY_DEPTH_ANYTHING, TINY_FLUX_DEPTH, ensure_embedded

    return ensure_embedded(TINY_FLUX_DEPTH, cache_dir), ensure_embedded(TINY_DEPTH_ANYTHING,
                                                                          cache_dir)


@pytest.fixture(scope="module")
def engine(paths, cache_dir):
    from deployments.engines import create_engine

    return create_engine(MODEL, cache_dir, None)


def _request(picture=SCENE, prompt="a quiet room", **overrides) -> GenerationRequest:
    source, width, height = source_image(png_bytes(picture), None, 0.4, None, None, MODEL)
    return GenerationRequest.for_model(MODEL, prompt, width=width, height=height,
                                       source=source, **{"seed": 5, **overrides})


def _depth_map(estimator_path, picture: Image.Image) -> Image.Image:
    """The estimator freshly loaded through transformers' own classes: its relative depth
    at the picture's size (bicubic), min to max spread over 0-255, as grey RGB."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    model = AutoModelForDepthEstimation.from_pretrained(estimator_path)
    inputs = AutoImageProcessor.from_pretrained(estimator_path)(images=picture,
                                                                return_tensors="pt")
    with torch.no_grad():
        depth = model(**inputs).predicted_depth
    depth = F.interpolate(depth[None], size=picture.size[::-1], mode="bicubic")[0, 0]
    depth = (depth - depth.min()) / (depth.max() - depth.min())
    return Image.fromarray((depth * 255).round().to(torch.uint8).numpy()).convert("RGB")


def test_the_tiny_depth_and_estimator_are_saved_in_the_real_layouts(paths):
    flux, estimator = paths
    assert json.loads((flux / "model_index.json").read_text())["_class_name"] == \
        "FluxControlPipeline"
    config = json.loads((flux / "transformer" / "config.json").read_text())
    assert (config["in_channels"], config["out_channels"]) == (128, 64)
    assert json.loads((estimator / "config.json").read_text())["architectures"] == [
        "DepthAnythingForDepthEstimation"]
    assert (estimator / "preprocessor_config.json").is_file()


def test_the_picture_is_sent_and_the_replica_draws_from_its_depth_map(engine, paths):
    request = _request()
    assert request.mode == "control"
    assert request.source.rgb == SCENE.tobytes()  # the picture itself, not edges
    ours = engine.depth_maps.of(SCENE)
    theirs = np.asarray(_depth_map(paths[1], SCENE)).astype(int)
    assert np.abs(np.asarray(ours).astype(int) - theirs).max() <= 1
    assert np.asarray(ours).min() == 0 and np.asarray(ours).max() == 255


def test_batched_requests_give_diffusers_pixels_for_their_depth_maps(engine, paths):
    from diffusers import FluxControlPipeline

    flipped = scene(flip=True)
    a, b = _request(), _request(flipped, "a window", seed=9, num_outputs=2)
    out = engine.generate([a, b])
    pipe = FluxControlPipeline.from_pretrained(paths[0])
    pipe.set_progress_bar_config(disable=True)
    for request, picture, images in zip((a, b), (SCENE, flipped), out, strict=True):
        theirs = pipe(prompt=request.prompt, control_image=_depth_map(paths[1], picture),
                      width=96, height=64, num_inference_steps=4, guidance_scale=10,
                      num_images_per_prompt=request.num_outputs,
                      generator=[torch.Generator().manual_seed(s) for s in request.seeds],
                      max_sequence_length=engine.max_sequence_length).images
        assert len(images) == request.num_outputs
        for mine, reference in zip(images, theirs, strict=True):
            assert_same_pixels(mine, reference)
    (alone,), = engine.generate([a])
    assert_same_pixels(alone, out[0][0])
    assert np.abs(np.asarray(alone).astype(int) - np.asarray(out[1][0])).mean() > 1


def test_a_depth_model_needs_an_image_and_takes_no_mask_nor_edges(engine):
    with pytest.raises(InvalidField) as err:
        GenerationRequest.for_model(MODEL, "a room", width=64, height=64)
    assert err.value.field == "image" and "depth of a control image" in err.value.reason
    mask = Image.new("L", SCENE.size)
    for extra, field in (({"mask": png_bytes(mask)}, "mask"),
                         ({"edges": (None, 300)}, "canny_high_threshold")):
        with pytest.raises(InvalidField) as err:
            source_image(png_bytes(SCENE), extra.pop("mask", None), 0.4, None, None, MODEL, **extra)
        assert err.value.field == field
    # Warm-up's blank control gets a map of its size like any picture.
    assert engine.depth_maps.of(Image.new("RGB", (32, 48))).size == (32, 48)


@pytest.mark.parametrize("changes, message", [
    ({"depth_estimator": None}, ("a Depth model and a model with a ControlNet that "
                                 "preprocesses depth need one")),
    ({"depth": False, "embedded": "tiny-flux"}, "and only they take one"),
    ({"canny": True}, "a model is one FLUX.1 tool"),
    ({"embedded": "tiny-flux-canny"}, "not a flux Depth model"),
])
def test_the_config_ties_depth_to_its_weights_and_estimator(changes, message):
    data = MODEL.model_dump(exclude_defaults=True) | changes
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": [data]})


def test_start_up_checks_the_folders_and_reads_canny_and_depth_folders_alike(paths, tmp_path):
    flux, estimator = paths

    def config(**changes):
        data = {"id": "a/d", "family": "flux", "path": str(flux), "depth": True,
                "depth_estimator": {"path": str(estimator)}} | changes
        return parse_config({"models": [data]})

    config().check_paths()
    # A FluxControlPipeline folder is Canny or Depth: its name does not tell which.
    parse_config({"models": [{"id": "a/c", "family": "flux", "path": str(flux),
                              "canny": True}]}).check_paths()
    (tmp_path / "config.json").write_text((estimator / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"models\.0\.depth_estimator\.path: .* holds no "
                                          r"preprocessor_config\.json"):
        config(depth_estimator={"path": str(tmp_path)}).check_paths()
    with pytest.raises(ConfigError, match="holds FLUX.1 Canny weights|holds FLUX.1 Depth"):
        parse_config({"models": [{"id": "a/p", "family": "flux",
                                  "path": str(flux)}]}).check_paths()


def test_replicate_flux_depth_dev_inputs():
    from serve.routes.replicate_flux import DepthInput
    from serve.routes.replicate_schemas import input_class

    assert input_class(MODEL) is DepthInput
    inp = DepthInput.model_validate({"prompt": "x", "control_image": "data:,",
                                     "megapixels": "0.25", "guidance": 10})
    assert (inp.image, inp.mask, inp.source_area()) == ("data:,", None, 512 * 512)
    assert [inp.field_of(f) for f in ("image", "width")] == ["control_image", "megapixels"]
