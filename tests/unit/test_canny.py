"""FLUX.1 Canny on the embedded tiny Canny (CPU): the tiny FLUX's configs with a transformer
that also takes the control image's latents (128 input channels, as FLUX.1-Canny-dev),
random weights, saved as a FluxControlPipeline folder and loaded as one. A request's image
becomes its Canny edges at the output's size, and the pixels are diffusers' own
FluxControlPipeline's for those edges, alone or batched."""

import io
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from serve.config import ConfigError, ModelConfig, parse_config
from serve.errors import InvalidField
from serve.source_images import source_image
from serve.types import GenerationRequest
from tests.pictures import png_bytes
from tests.unit.test_engine import assert_same_pixels, withdrawing

MODEL = ModelConfig(id="a/canny", family="flux", embedded="tiny-flux-canny", canny=True,
                    dtype="float32", defaults={"width": 96, "height": 96,
                                               "num_inference_steps": 4, "guidance_scale": 30})
# A drawing with edges: a yellow and a blue box on grey, 96 wide and 64 high.
DRAWING = np.full((64, 96, 3), 128, np.uint8)
DRAWING[8:40, 8:48] = (250, 230, 60)
DRAWING[24:60, 56:90] = (20, 20, 200)


@pytest.fixture(scope="module")
def canny_path(cache_dir):
    from deployments.tiny import TINY_FLUX_CANNY, ensure_embedded

    return ensure_embedded(TINY_FLUX_CANNY, cache_dir)


@pytest.fixture(scope="module")
def engine(canny_path, cache_dir):
    from deployments.engines import create_engine

    return create_engine(MODEL, cache_dir, None)


@pytest.fixture(scope="module")
def reference(canny_path):
    """diffusers' own control pipeline over the same files."""
    from diffusers import FluxControlPipeline

    pipe = FluxControlPipeline.from_pretrained(canny_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _control(pixels=DRAWING, prompt="a red box and a blue box", **overrides):
    source, width, height = source_image(png_bytes(pixels), None, 0.4, None, None, MODEL)
    return GenerationRequest.for_model(MODEL, prompt, width=width, height=height,
                                       source=source, **{"seed": 5, **overrides})


def _px(image):
    return np.asarray(image).astype(int)


def _diffusers(reference, request, engine) -> list:
    """The pipeline's images for the request's edges (given once: the pipeline repeats
    them per image, each encoded with its own generator, as ours are)."""
    size, n = (request.width, request.height), request.num_outputs
    return reference(
        prompt=request.prompt, control_image=Image.frombytes("RGB", size, request.source.rgb),
        width=size[0], height=size[1], num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale, num_images_per_prompt=n,
        generator=[torch.Generator().manual_seed(s) for s in request.seeds],
        max_sequence_length=engine.max_sequence_length).images


def test_the_tiny_canny_is_a_control_folder_whose_transformer_takes_the_edges(canny_path):
    index = json.loads((canny_path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxControlPipeline"
    config = json.loads((canny_path / "transformer" / "config.json").read_text())
    assert (config["in_channels"], config["out_channels"]) == (128, 64)


def test_an_image_becomes_its_canny_edges_at_the_output_size():
    request = _control()
    assert request.mode == "control" and request.source.strength == 1.0
    assert (request.width, request.height) == (96, 64) and request.source.mask is None
    edges = cv2.Canny(np.asarray(Image.fromarray(DRAWING).convert("L")), 50, 200)
    ours = np.frombuffer(request.source.rgb, np.uint8).reshape(64, 96, 3)
    assert np.array_equal(ours[..., 0], edges) and (ours[..., 0] == ours[..., 2]).all()
    assert set(np.unique(edges)) == {0, 255} and (edges[:, :50] == 255).sum() > 100
    assert (edges[:, 50:] == 255).sum() > 100  # both boxes outlined
    # At another size, the edges are found on the resized picture (sharp, not resampled).
    source, width, height = source_image(png_bytes(DRAWING), None, 0.4, 192, 128, MODEL)
    assert (width, height) == (192, 128) and set(source.rgb) == {0, 255}


def test_thresholds_set_which_gradients_are_edges():
    """The request's thresholds go to OpenCV as given, the other one at its default;
    higher ones find fewer edges on a photo. Given to another model, or a low one over the
    high one, they are refused, naming the field."""
    photo = np.random.default_rng(3).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    found = {}
    for edges in ((None, None), (150, None), (None, 400), (100, 500)):
        source, _, _ = source_image(png_bytes(photo), None, 0.4, None, None, MODEL, edges=edges)
        low, high = (d if e is None else e for e, d in zip(edges, (50, 200), strict=True))
        ours = np.frombuffer(source.rgb, np.uint8).reshape(64, 96, 3)[..., 0]
        assert np.array_equal(ours, cv2.Canny(grey, low, high))
        found[edges] = (ours == 255).sum()
    assert found[(None, None)] > found[(None, 400)] > found[(100, 500)] > 0
    plain = ModelConfig(id="a/flux", family="flux", embedded="tiny-flux")
    for model, edges, field in ((plain, (None, 300), "canny_high_threshold"),
                                (MODEL, (300, 200), "canny_low_threshold")):
        with pytest.raises(InvalidField) as refused:
            source_image(png_bytes(photo), None, 0.4, None, None, model, edges=edges)
        assert refused.value.field == field


def test_batched_controls_give_diffusers_pixels_per_image_and_seed(engine, reference):
    a = _control()
    b = _control(255 - DRAWING[:, ::-1], "a window", seed=9, num_outputs=2)
    out = engine.generate([a, b])
    assert [len(images) for images in out] == [1, 2]
    for request, images in zip((a, b), out, strict=True):
        for ours, theirs in zip(images, _diffusers(reference, request, engine), strict=True):
            assert_same_pixels(ours, theirs)
    (alone,), = engine.generate([a])
    assert_same_pixels(alone, out[0][0])
    # Other edges, same prompt and seed: another image.
    other = _control(np.roll(DRAWING, 30, axis=1))
    assert np.abs(_px(engine.generate([other])[0][0]) - _px(alone)).mean() > 2


def test_each_step_reads_the_control_latents_and_rows_stay(engine):
    a, b = _control(), _control(seed=8)
    (alone,), = engine.generate([a])
    out, shapes = withdrawing(engine, [a, b], 1, engine.pipe.transformer,
                              lambda args, kwargs: tuple(kwargs["hidden_states"].shape))
    assert shapes == [(2, 6 * 4, 128)] * a.num_inference_steps  # 96x64: 6x4 tokens
    assert_same_pixels(out[0][0], alone)
    steps = []
    out = engine.generate([a, b], withdrawn=lambda: {0, 1} if steps else set(),
                          on_step=lambda s, t: steps.append(s))
    assert steps == [1] and out == [[], []]


def test_a_canny_model_needs_an_image_and_takes_no_mask():
    with pytest.raises(InvalidField) as err:
        GenerationRequest.for_model(MODEL, "a box", width=64, height=64)
    assert err.value.field == "image" and "edges of a control image" in err.value.reason
    with pytest.raises(InvalidField) as err:
        source_image(png_bytes(DRAWING), png_bytes(np.zeros((64, 96), np.uint8)), 0.4, None, None, MODEL)
    assert err.value.field == "mask" and "takes no mask" in err.value.reason
    # An image's transparency is no mask here: it is flattened onto white, as elsewhere.
    rgba = np.dstack([DRAWING, np.full((64, 96), 255, np.uint8)])
    rgba[:, :10, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    source, _, _ = source_image(buffer.getvalue(), None, 0.4, None, None, MODEL)
    assert source.mode == "control" and source.mask is None


def test_the_warm_up_request_of_a_canny_model_is_a_blank_control():
    from deployments.model import ModelDeployment

    request = ModelDeployment.func_or_class._warm_request(
        type("Replica", (), {"cfg": MODEL})(), 2)
    assert request.mode == "control" and set(request.source.rgb) == {0}
    request.check_limits(MODEL.limits, MODEL.rules)


@pytest.mark.parametrize("changes, message", [
    ({"family": "sdxl", "embedded": "tiny-sdxl"}, "only flux models are Canny models"),
    ({"fill": True}, "a model is one FLUX.1 tool, not fill and canny"),
    ({"embedded": "tiny-flux"}, "'tiny-flux' is not a flux Canny model"),
    ({"canny": False}, "'tiny-flux-canny' is not a flux model; set canny: true")])
def test_the_config_ties_canny_to_its_weights(changes, message):
    data = {**MODEL.model_dump(exclude_defaults=True), **changes}
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": [data]})


def test_start_up_refuses_a_folder_of_another_kind(canny_path, tiny_flux_path):
    def config(path, **kind):
        return parse_config({"models": [{"id": "a/c", "family": "flux", "path": str(path),
                                         **kind}]})

    config(canny_path, canny=True).check_paths()
    with pytest.raises(ConfigError, match=r"models\.0\.canny: .* holds a FluxPipeline"):
        config(tiny_flux_path, canny=True).check_paths()
    with pytest.raises(ConfigError, match=r"models\.0\.canny: .* set canny: true"):
        config(canny_path).check_paths()


def test_replicate_flux_canny_dev_inputs():
    from serve.routes.replicate_flux import CannyInput
    from serve.routes.replicate_schemas import input_class

    assert input_class(MODEL) is CannyInput
    inp = CannyInput.model_validate({"prompt": "x", "control_image": "data:,",
                                     "megapixels": "0.25", "guidance": 30})
    assert (inp.image, inp.mask, inp.source_area()) == ("data:,", None, 512 * 512)
    assert inp.request_args()["guidance_scale"] == 30
    assert [inp.field_of(f) for f in ("image", "width", "guidance_scale")] == [
        "control_image", "megapixels", "guidance"]
    assert inp.edge_thresholds() == (None, None)
    given = CannyInput.model_validate({"prompt": "x", "control_image": "data:,",
                                       "canny_low_threshold": 80, "canny_high_threshold": 300})
    assert given.edge_thresholds() == (80, 300)


def test_a_flux_lora_changes_a_canny_drawing_in_slots(canny_path, cache_dir):
    from dataclasses import replace

    from deployments.engines.flux import FluxControlEngine
    from deployments.tiny import TINY_FLUX_DEMO, ensure_demo_loras
    from serve.adapters import AdapterCatalog, AdapterSet

    catalog = AdapterCatalog.scan([(ensure_demo_loras(TINY_FLUX_DEMO, cache_dir), "flux",
                                    1.0)]).entries
    engine = FluxControlEngine(canny_path, "float32", "cpu", adapters=catalog)
    plain = _control()
    neon = replace(plain, adapters=AdapterSet.of([("neon", 1.0)]))
    together = engine.generate([plain, neon])
    alone = [engine.generate([r])[0][0] for r in (plain, neon)]
    for (ours,), solo in zip(together, alone, strict=True):
        assert_same_pixels(ours, solo)
    assert np.abs(_px(alone[1]) - _px(alone[0])).mean() > 1
