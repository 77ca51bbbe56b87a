"""Text-to-image steered by a ControlNet, on the tiny SDXL's engine with the embedded tiny
ControlNet (CPU): the same pixels as diffusers' own ControlNet pipeline, the control
image's effect, batches of different control images, withdrawal, switching ControlNets,
and the Canny preprocessing."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from deployments.tiny import TINY_SDXL_CONTROLNET, ensure_embedded
from serve.images import canny
from serve.types import ControlImage, GenerationRequest, SourceImage
from tests.unit.test_engine import _px, assert_same_pixels

BASE = GenerationRequest(model="a/b", prompt="a red cube", width=64, height=64,
                         num_inference_steps=6, guidance_scale=7.5, seed=5,
                         scheduler="K_EULER")


def _shapes(box: tuple[int, int, int, int]) -> Image.Image:
    """A white rectangle and a grey disc on black: a control map with clear shapes."""
    image = Image.new("RGB", (64, 64))
    draw = ImageDraw.Draw(image)
    draw.rectangle(box, fill=(255, 255, 255))
    draw.ellipse((36, 36, 60, 60), fill=(128, 128, 128))
    return image


SQUARE, WIDE = _shapes((8, 8, 30, 30)), _shapes((4, 20, 60, 32))


@pytest.fixture(scope="module")
def controlnet_path(cache_dir):
    return ensure_embedded(TINY_SDXL_CONTROLNET, cache_dir)


@pytest.fixture(scope="module")
def other_controlnet(controlnet_path, tmp_path_factory):
    """The tiny ControlNet with its output convolutions drawn again: another ControlNet of
    the same design, saved as diffusers saves one."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(controlnet_path)
    torch.manual_seed(1)
    for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.1)
    folder = tmp_path_factory.mktemp("other-controlnet")
    net.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def engine(tiny_sdxl_path, controlnet_path, other_controlnet):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float32", "cpu",
                      controlnets={"canny": (controlnet_path, None),
                                   "other": (other_controlnet, None)})


def _req(control: Image.Image, scale: float = 1.0, name: str = "canny", **overrides):
    return replace(BASE, control=ControlImage(name, control.tobytes(), scale), **overrides)


def test_the_images_are_diffusers_own_controlnet_pipelines(engine, controlnet_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    request = _req(SQUARE, 0.7, num_outputs=2, negative_prompt="blurry")
    ours = engine.generate([request])[0]
    reference = StableDiffusionXLControlNetPipeline.from_pipe(
        engine.pipe, controlnet=ControlNetModel.from_pretrained(controlnet_path))
    reference.set_progress_bar_config(disable=True)
    theirs = reference(prompt="a red cube", negative_prompt="blurry", image=SQUARE,
                       width=64, height=64, num_inference_steps=6, guidance_scale=7.5,
                       controlnet_conditioning_scale=0.7, num_images_per_prompt=2,
                       generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images
    for a, b in zip(ours, theirs, strict=True):
        assert_same_pixels(a, b)


def test_scale_zero_draws_the_plain_image_and_the_control_image_moves_it(engine):
    plain = engine.generate([BASE])[0][0]
    assert np.array_equal(_px(engine.generate([_req(SQUARE, 0.0)])[0][0]), _px(plain))
    square, wide = (engine.generate([_req(c)])[0][0] for c in (SQUARE, WIDE))
    # Measured: 7.4 and 7.1 levels from the plain image, 1.2 between the two (random
    # weights: the ControlNet's own pass counts more than the control image here).
    assert np.abs(_px(square) - _px(plain)).mean() > 3
    assert np.abs(_px(square) - _px(wide)).mean() > 0.6


def test_steering_only_the_first_steps_moves_the_image_less(engine):
    plain, full = engine.generate([BASE])[0][0], engine.generate([_req(SQUARE)])[0][0]
    early = replace(BASE, control=ControlImage("canny", SQUARE.tobytes(), 1.0, 0.0, 0.34))
    part = engine.generate([early])[0][0]
    gap = np.abs(_px(part) - _px(plain)).mean()
    # Measured: 6.7 levels from the plain image (the whole run's: 7.4), 1.6 from it.
    assert 0 < gap < np.abs(_px(full) - _px(plain)).mean()
    assert np.abs(_px(part) - _px(full)).mean() > 0.8


def test_each_image_follows_its_own_control_image_in_a_shared_call(engine):
    a, b = _req(SQUARE), _req(WIDE, seed=9, prompt="a blue cone")
    assert engine.batch_key(a) == engine.batch_key(b)
    together = engine.generate([a, b])
    assert_same_pixels(together[0][0], engine.generate([a])[0][0])
    assert_same_pixels(together[1][0], engine.generate([b])[0][0])


def test_a_withdrawn_request_leaves_and_the_other_keeps_its_pixels(engine):
    batch = [_req(SQUARE), _req(WIDE, seed=9, num_outputs=2), _req(SQUARE, seed=11)]
    untouched = engine.generate(batch)
    steps, rows = [], []
    hook = engine.controlnets["canny"].register_forward_pre_hook(
        lambda module, args: rows.append(args[0].shape[0]))
    try:
        out = engine.generate(batch, withdrawn=lambda: {1} if len(steps) >= 3 else set(),
                              on_step=lambda s, t: steps.append(s))
    finally:
        hook.remove()
    assert [len(images) for images in out] == [1, 0, 1]
    assert_same_pixels(out[0][0], untouched[0][0])
    assert_same_pixels(out[2][0], untouched[2][0])
    assert rows[0] == 8 and rows[-1] == 4  # two guidance rows per image: 4 images, then 2


def test_each_call_runs_the_controlnet_its_requests_name(engine):
    canny_image = engine.generate([_req(SQUARE)])[0][0]
    other = engine.generate([_req(SQUARE, name="other")])[0][0]
    assert np.abs(_px(other) - _px(canny_image)).mean() > 1
    assert np.array_equal(_px(engine.generate([_req(SQUARE)])[0][0]), _px(canny_image))
    assert _req(SQUARE).batch_key != _req(SQUARE, name="other").batch_key
    assert _req(SQUARE).batch_key != _req(SQUARE, 0.5).batch_key
    assert _req(SQUARE).batch_key != BASE.batch_key


def test_warm_up_runs_each_controlnet(engine):
    calls = {name: [] for name in engine.controlnets}
    hooks = [net.register_forward_pre_hook(lambda m, a, name=name: calls[name].append(1))
             for name, net in engine.controlnets.items()]
    try:
        engine.warm_up(BASE)
    finally:
        for hook in hooks:
            hook.remove()
    assert {name: len(c) for name, c in calls.items()} == {"canny": 6, "other": 6}
    facts = engine.describe()
    assert facts["controlnets"] == ["canny", "other"]
    assert facts["weights"]["controlnet canny"] == facts["weights"]["unet"] == "float32"


def test_canny_gives_white_edges_on_black_along_the_shapes():
    edges = np.asarray(canny(_shapes((8, 8, 30, 30))))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    white = edges[..., 0] == 255
    assert white[8:31, 6:11].any() and white[6:11, 8:31].any()  # the square's sides
    assert not white[14:25, 14:25].any()  # nothing inside it
    assert not white[:, :4].any()  # nor on the blank border


def test_a_request_checks_its_controlnet_against_the_model():
    from serve.config import default_config
    from serve.errors import InvalidField

    sdxl, flux = default_config().models
    control = ControlImage("canny", bytes(64 * 64 * 3))
    made = GenerationRequest.for_model(sdxl, "x", width=64, height=64, control=control)
    assert made.mode == "controlnet"
    cases = [(flux, {"control": control}, "controlnet"),
             (sdxl, {"control": replace(control, name="depth")}, "controlnet"),
             (sdxl, {"control": replace(control, start=0.5, end=0.5)},
              "control_guidance_start"),
             (sdxl, {"control": control, "source": SourceImage(bytes(64 * 64 * 3), 0.5)},
              "control_image")]
    for model, fields, field in cases:
        with pytest.raises(InvalidField) as err:
            GenerationRequest.for_model(model, "x", width=64, height=64, **fields)
        assert err.value.field == field
