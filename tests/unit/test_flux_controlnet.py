"""FLUX images steered by ControlNets, on the tiny FLUX's engine with the embedded tiny
union ControlNet (InstantX's design) named twice, for two of its modes (CPU): the same
pixels as diffusers' own FLUX ControlNet pipelines, the control image's and the mode's
effect, batches of different control images, several ControlNets at once, img2img and
inpainting, withdrawal, warm-up, and the config's checks."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.engines.controlnets import NetFiles
from deployments.tiny import TINY_DEPTH_ANYTHING, TINY_FLUX_CONTROLNET, ensure_embedded
from serve.config import ConfigError, ModelConfig, parse_config
from serve.types import ControlImage, GenerationRequest, SourceImage
from tests.pictures import scene
from tests.unit.test_engine import _px, assert_same_pixels, withdrawing

BASE = GenerationRequest(model="a/flux", prompt="a red shoe on a table", width=128,
                         height=96, num_inference_steps=6, guidance_scale=3.5, seed=11,
                         scheduler="FlowMatchEuler")
SCENE, FLIPPED = (scene(flip).resize((128, 96)).convert("RGB") for flip in (False, True))


@pytest.fixture(scope="module")
def controlnet_path(cache_dir):
    return ensure_embedded(TINY_FLUX_CONTROLNET, cache_dir)


@pytest.fixture(scope="module")
def estimator_path(cache_dir):
    return ensure_embedded(TINY_DEPTH_ANYTHING, cache_dir)


@pytest.fixture(scope="module")
def engine(tiny_flux_path, controlnet_path, estimator_path):
    from deployments.engines.flux import FluxEngine

    return FluxEngine(tiny_flux_path, "float32", "cpu",
                      controlnets={"canny": NetFiles(controlnet_path, None, 0),
                                   "depth": NetFiles(controlnet_path, None, 2),
                                   "depth-picture": NetFiles(controlnet_path, None, 2, True)},
                      depth_estimator=estimator_path)


def _req(control: Image.Image, scale: float = 1.0, name: str = "canny", **overrides):
    return replace(BASE, controls=(ControlImage(name, control.tobytes(), scale),), **overrides)


def _reference(engine, controlnet_path, nets: int = 1):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxMultiControlNetModel

    net = FluxControlNetModel.from_pretrained(controlnet_path)
    pipe = FluxControlNetPipeline.from_pipe(
        engine.pipe, controlnet=net if nets == 1 else FluxMultiControlNetModel([net] * nets))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_images_are_diffusers_own_flux_controlnet_pipeline(engine, controlnet_path):
    ours = engine.generate([_req(SCENE, 0.7, num_outputs=2)])[0]
    theirs = _reference(engine, controlnet_path)(
        prompt=BASE.prompt, control_image=SCENE, control_mode=0, width=128, height=96,
        num_inference_steps=6, guidance_scale=3.5, controlnet_conditioning_scale=0.7,
        num_images_per_prompt=2, max_sequence_length=engine.max_sequence_length,
        generator=[torch.Generator().manual_seed(s) for s in (11, 12)]).images
    for a, b in zip(ours, theirs, strict=True):
        assert_same_pixels(a, b)


def test_the_control_image_and_its_scale_move_the_image(engine):
    scene_image, flipped = (engine.generate([_req(c)])[0][0] for c in (SCENE, FLIPPED))
    unsteered = engine.generate([_req(SCENE, 0.0)])[0][0]
    half = engine.generate([_req(SCENE, 0.5)])[0][0]
    # Measured: 8.8 levels between the two control images, 27 between scales 1 and 0,
    # 3.2 between scales 1 and 0.5.
    assert np.abs(_px(scene_image) - _px(flipped)).mean() > 4
    assert np.abs(_px(scene_image) - _px(unsteered)).mean() > 10
    assert 1 < np.abs(_px(scene_image) - _px(half)).mean() < 10
    assert np.array_equal(_px(engine.generate([_req(SCENE)])[0][0]), _px(scene_image))


def test_each_name_serves_its_mode_of_the_union_controlnet_loaded_once(engine):
    nets = engine.controlnets.nets
    assert nets["canny"] is nets["depth"]
    modes = []
    hook = nets["canny"].register_forward_pre_hook(
        lambda m, args, kwargs: modes.append(kwargs["controlnet_mode"].flatten().tolist()),
        with_kwargs=True)
    try:
        canny_image = engine.generate([_req(SCENE, num_outputs=2)])[0][0]
        depth_image = engine.generate([_req(SCENE, name="depth", num_outputs=2)])[0][0]
    finally:
        hook.remove()
    assert modes == [[0, 0]] * 6 + [[2, 2]] * 6  # each step, both images' rows
    # The random mode embedding is one token among the prompt's 256: measured 0.012 levels.
    assert not np.array_equal(_px(canny_image), _px(depth_image))
    assert _req(SCENE).batch_key != _req(SCENE, name="depth").batch_key


def test_a_controlnet_that_preprocesses_depth_reads_the_pictures_depth_map(
        engine, estimator_path):
    """`preprocess: depth`: the replica estimates the picture's depth map (as FLUX.1 Depth
    does), the same pixels as that map sent to a ControlNet that takes maps; a picture
    sent again is estimated once."""
    from deployments.engines.depth import DepthMaps

    depth_map = DepthMaps(estimator_path, torch.float32, torch.device("cpu")).of(SCENE)
    assert len(np.unique(np.asarray(depth_map))) > 20  # a relief, not a flat grey
    estimates = []
    hook = engine.depth_maps.model.register_forward_hook(lambda *a: estimates.append(1))
    try:
        from_picture = engine.generate([_req(SCENE, name="depth-picture")])[0][0]
        again = engine.generate([_req(SCENE, name="depth-picture", seed=3)])[0][0]
        from_flipped = engine.generate([_req(FLIPPED, name="depth-picture")])[0][0]
    finally:
        hook.remove()
    assert estimates == [1, 1]  # SCENE once, FLIPPED once
    assert_same_pixels(from_picture, engine.generate([_req(depth_map, name="depth")])[0][0])
    assert np.abs(_px(from_picture) - _px(from_flipped)).mean() > 1
    assert np.abs(_px(from_picture) - _px(again)).mean() > 1  # another seed


def test_each_image_follows_its_own_control_image_in_a_shared_call(engine):
    a, b = _req(SCENE), _req(FLIPPED, seed=9, prompt="a blue cone")
    assert engine.batch_key(a) == engine.batch_key(b)
    together = engine.generate([a, b])
    assert_same_pixels(together[0][0], engine.generate([a])[0][0])
    assert_same_pixels(together[1][0], engine.generate([b])[0][0])


def test_each_image_keeps_its_guidance_scale_in_the_transformer_and_the_controlnet(engine):
    a, b = _req(SCENE), _req(FLIPPED, seed=9, guidance_scale=7.0)
    assert engine.batch_key(a) == engine.batch_key(b)
    together = engine.generate([a, b])
    assert_same_pixels(together[0][0], engine.generate([a])[0][0])
    assert_same_pixels(together[1][0], engine.generate([b])[0][0])


def test_two_controlnets_combine_as_diffusers_multicontrolnet_does(engine, controlnet_path):
    both = replace(BASE, controls=(ControlImage("canny", SCENE.tobytes(), 0.8),
                                   ControlImage("depth", FLIPPED.tobytes(), 0.6)))
    ours = engine.generate([both])[0][0]
    theirs = _reference(engine, controlnet_path, nets=2)(
        prompt=BASE.prompt, control_image=[SCENE, FLIPPED], control_mode=[0, 2], width=128,
        height=96, num_inference_steps=6, guidance_scale=3.5,
        controlnet_conditioning_scale=[0.8, 0.6], max_sequence_length=engine.max_sequence_length,
        generator=[torch.Generator().manual_seed(11)]).images[0]
    assert_same_pixels(ours, theirs)


INPUT = np.random.default_rng(4).integers(0, 256, (96, 128, 3), dtype=np.uint8)
MASK = np.zeros((96, 128), np.uint8)
MASK[16:64, 32:96] = 255


def test_img2img_with_a_controlnet_is_diffusers_own(engine, controlnet_path):
    from diffusers import FluxControlNetImg2ImgPipeline, FluxControlNetModel

    source = SourceImage(Image.fromarray(INPUT).tobytes(), 0.7)
    ours = engine.generate([_req(SCENE, 0.9, source=source)])[0][0]
    reference = FluxControlNetImg2ImgPipeline.from_pipe(
        engine.pipe, controlnet=FluxControlNetModel.from_pretrained(controlnet_path))
    reference.set_progress_bar_config(disable=True)
    theirs = reference(prompt=BASE.prompt, image=Image.fromarray(INPUT), control_image=SCENE,
                       control_mode=0, strength=0.7, width=128, height=96,
                       num_inference_steps=6, guidance_scale=3.5,
                       controlnet_conditioning_scale=0.9,
                       max_sequence_length=engine.max_sequence_length,
                       generator=[torch.Generator().manual_seed(11)]).images[0]
    assert_same_pixels(ours, theirs)


def test_a_hires_pass_is_steered_too_as_diffusers_img2img_controlnet_pipeline(
        engine, controlnet_path):
    """The ControlNet text-to-image pipeline, the images upscaled bicubically, then the
    ControlNet img2img pipeline over them with the control image (in the VAE's [-1, 1])
    upscaled bilinearly, the same generator throughout."""
    from diffusers import FluxControlNetImg2ImgPipeline

    hires = {"hires_scale": 1.5, "hires_strength": 0.6, "hires_upscaler": "bicubic",
             "hires_multiple": 16}
    ours = engine.generate([_req(SCENE, 0.8, **hires)])[0][0]
    first = _reference(engine, controlnet_path)
    second = FluxControlNetImg2ImgPipeline.from_pipe(first)
    control = torch.from_numpy(np.array(SCENE)).permute(2, 0, 1)[None].float() / 127.5 - 1
    args = {"prompt": BASE.prompt, "guidance_scale": 3.5, "control_mode": 0,
            "controlnet_conditioning_scale": 0.8, "num_inference_steps": 6,
            "max_sequence_length": engine.max_sequence_length,
            "generator": [torch.Generator().manual_seed(11)]}
    drawn = first(control_image=control, width=128, height=96, output_type="pt",
                  **args).images
    upscaled = torch.nn.functional.interpolate(drawn, size=(144, 192), mode="bicubic")
    theirs = second(image=upscaled.clamp(0, 1), strength=0.6, width=192, height=144,
                    control_image=torch.nn.functional.interpolate(
                        control, size=(144, 192), mode="bilinear"), **args).images[0]
    assert ours.size == (192, 144)
    assert_same_pixels(ours, theirs)
    unsteered = engine.generate([replace(BASE, **hires)])[0][0]
    assert np.abs(_px(ours) - _px(unsteered)).mean() > 1


def test_inpainting_with_a_controlnet_keeps_the_unmasked_pixels(engine):
    source = SourceImage(Image.fromarray(INPUT).tobytes(), 0.9, Image.fromarray(MASK).tobytes())
    steered = engine.generate([_req(SCENE, source=source)])[0][0]
    other = engine.generate([_req(FLIPPED, source=source)])[0][0]
    assert np.array_equal(_px(steered)[MASK == 0], INPUT[MASK == 0].astype(int))
    assert np.abs(_px(steered) - _px(other))[MASK == 255].mean() > 2


def test_a_withdrawn_request_runs_on_unseen_and_the_others_keep_their_pixels(engine):
    """The FLUX ControlNet pipelines encode the control images before their loop, out of
    the step callback's reach: a withdrawn request's rows stay to the call's end (its
    images are made; a replica drops them), and the call stops once every request has
    left."""
    batch = [_req(SCENE), _req(FLIPPED, seed=9, num_outputs=2), _req(SCENE, seed=13)]
    untouched = engine.generate(batch)
    out, rows = withdrawing(engine, batch, 3, engine.pipe.transformer,
                            lambda args, kwargs: kwargs["hidden_states"].shape[0])
    assert [len(images) for images in out] == [1, 2, 1]
    assert rows == [4] * 6
    assert_same_pixels(out[0][0], untouched[0][0])
    assert_same_pixels(out[2][0], untouched[2][0])
    steps = []
    engine.generate([_req(SCENE)], withdrawn=lambda: {0} if steps else set(),
                    on_step=lambda s, t: steps.append(s))
    assert steps == [1]


def test_warm_up_runs_each_controlnet_and_describe_lists_them(engine):
    modes = []
    net = engine.controlnets.nets["canny"]
    hook = net.register_forward_pre_hook(
        lambda m, args, kwargs: modes.append(int(kwargs["controlnet_mode"][0])),
        with_kwargs=True)
    try:
        engine.warm_up(replace(BASE, num_inference_steps=2))
    finally:
        hook.remove()
    assert modes == [0, 0, 2, 2, 2, 2]
    facts = engine.describe()
    assert facts["controlnets"] == ["canny", "depth", "depth-picture"]
    assert facts["weights"]["controlnet depth"] == facts["weights"]["transformer"] == "float32"


def _flux(**controlnets) -> dict:
    return {"models": [{"id": "a/flux", "family": "flux", "embedded": "tiny-flux",
                        "controlnets": controlnets}]}


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    return str(err.value)


def test_the_config_takes_flux_controlnets_on_plain_flux_models_only():
    union = {"embedded": "tiny-flux-controlnet", "control_mode": 0}
    model = parse_config(_flux(canny=union)).models[0]
    assert model.controlnets["canny"].control_mode == 0
    assert "controlnets.canny: Value error, control_mode: the union ControlNet needs one " \
           "from 0 to 9" in _error(_flux(canny={"embedded": "tiny-flux-controlnet"}))
    assert "control_mode: the ControlNet is not a union one" in _error(
        {"models": [{"id": "a/b", "embedded": "tiny-sdxl", "controlnets": {
            "canny": {"embedded": "tiny-sdxl-controlnet", "control_mode": 1}}}]})
    assert "controlnets.canny.embedded: 'tiny-sdxl-controlnet' is a sdxl ControlNet, and " \
           "this is a flux model" in _error(_flux(canny={"embedded": "tiny-sdxl-controlnet"}))
    assert "depth_estimator: a Depth model and a model with a ControlNet that preprocesses " \
           "depth need one" in _error(_flux(depth=union | {"preprocess": "depth"}))
    with_estimator = _flux(depth=union | {"preprocess": "depth"})
    with_estimator["models"][0]["depth_estimator"] = {"embedded": "tiny-depth-anything"}
    assert parse_config(with_estimator).models[0].estimates_depth
    kontext = _flux(canny=union)
    kontext["models"][0] |= {"embedded": "tiny-flux-kontext", "kontext": True}
    assert "controlnets: a FLUX.1 Kontext model takes no ControlNets" in _error(kontext)


def test_a_controlnet_folder_must_be_of_the_models_family_and_hold_its_mode(
        tmp_path, controlnet_path):
    def check(family: str, mode: int | None, folder=controlnet_path):
        model = ModelConfig(id="a/b", family=family, embedded=f"tiny-{family}",
                            controlnets={"c": {"path": folder, "control_mode": mode}})
        with pytest.raises(ConfigError) as err:
            parse_config({"models": [model.model_dump()]}).check_paths()
        return str(err.value)

    assert "controlnets.c.path" in check("sdxl", None) and "ControlNetModel" in check("sdxl", None)
    assert check("flux", 12) == ("models.0.controlnets.c.control_mode: the union ControlNet "
                                 "needs one from 0 to 9")
    single = tmp_path / "single"
    single.mkdir()
    config = json.loads((controlnet_path / "config.json").read_text()) | {"num_mode": None}
    (single / "config.json").write_text(json.dumps(config))
    assert check("flux", 1, single).endswith("control_mode: the ControlNet is not a union one "
                                             "(it has no modes)")
    parse_config(_flux(c={"path": str(controlnet_path), "control_mode": 3})).check_paths()


def test_a_controlnet_of_union_pro_2s_design_runs_without_modes(tmp_path, tiny_flux_path):
    """Shakker Labs' Union Pro 2.0 design: double-stream blocks only, no mode embedding (a
    union trained without modes). The config takes it without a control_mode, and its
    images are diffusers' FluxControlNetPipeline's without one."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    from deployments.engines.flux import FluxEngine
    from deployments.tiny_flux import TINY_FLUX_CONFIGS, build_random_flux_controlnet

    folder = tmp_path / "union-pro-2"
    build_random_flux_controlnet(folder, TINY_FLUX_CONFIGS["transformer"],
                                 {"num_layers": 2, "num_single_layers": 0, "num_mode": None})
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_single_layers"], config["num_mode"]) == (0, None)
    parse_config(_flux(canny={"path": str(folder), "preprocess": "canny"})).check_paths()
    assert "control_mode: the ControlNet is not a union one" in _error_at_start(
        _flux(canny={"path": str(folder), "control_mode": 0}))
    engine = FluxEngine(tiny_flux_path, "float32", "cpu",
                        controlnets={"canny": NetFiles(folder, None, None)})
    request = _req(SCENE, 0.7, num_outputs=2)
    ours = engine.generate([request])[0]
    pipe = FluxControlNetPipeline.from_pipe(
        engine.pipe, controlnet=FluxControlNetModel.from_pretrained(folder))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=BASE.prompt, control_image=SCENE, width=128, height=96,
                  num_inference_steps=6, guidance_scale=3.5, controlnet_conditioning_scale=0.7,
                  num_images_per_prompt=2, max_sequence_length=engine.max_sequence_length,
                  generator=[torch.Generator().manual_seed(s) for s in (11, 12)]).images
    for a, b in zip(ours, theirs, strict=True):
        assert_same_pixels(a, b)
    unsteered = engine.generate([_req(SCENE, 0.0)])[0][0]
    assert np.abs(_px(ours[0]) - _px(unsteered)).mean() > 1  # it steers


def _error_at_start(data: dict) -> str:
    """The error start-up's check of the model's files gives."""
    with pytest.raises(ConfigError) as err:
        parse_config(data).check_paths()
    return str(err.value)
