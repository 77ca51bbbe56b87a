"""Few-step SDXL (SDXL-Lightning, Hyper-SD, Turbo, LCM), on the tiny SDXL (CPU): the model's
scheduler options reach every scheduler and give diffusers' own pixels, guidance 0 runs one
UNet row per image and keeps each request's pixels in a shared call, the DPM++2MSDE and LCM
schedulers are diffusers' with each image's generator, and the config's checks."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from serve.config import ConfigError, ModelConfig, parse_config
from serve.types import GenerationRequest
from tests.unit.test_engine import _px, assert_same_pixels, withdrawing

BASE = GenerationRequest(model="a/b", prompt="a red cube", width=64, height=64,
                         num_inference_steps=4, guidance_scale=0.0, seed=5,
                         scheduler="K_EULER")
TRAILING = {"timestep_spacing": "trailing"}


@pytest.fixture(scope="module")
def lightning(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float32", "cpu", scheduler_options=TRAILING)


def _diffusers(path, scheduler: str, options: dict, request: GenerationRequest, seeds,
               **call):
    """diffusers' own SDXL pipeline with the scheduler Atelier names `scheduler`, given
    `call`'s further arguments."""
    from diffusers import StableDiffusionXLPipeline

    from deployments.engines.sdxl_schedulers import SDXL_SCHEDULERS

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    cls, extra = SDXL_SCHEDULERS[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra, **options)
    return pipe(prompt=request.prompt, width=request.width, height=request.height,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale, num_images_per_prompt=len(seeds),
                generator=[torch.Generator().manual_seed(s) for s in seeds], **call).images


def test_trailing_timesteps_at_guidance_zero_are_diffusers_lightning_recipe(
        lightning, sdxl, tiny_sdxl_path):
    """SDXL-Lightning's recipe (Euler, trailing timesteps, 4 steps, no guidance): the pixels
    of diffusers' pipeline with that scheduler; the checkpoint's leading spacing draws
    another image."""
    ours = lightning.generate([replace(BASE, num_outputs=2)])[0]
    theirs = _diffusers(tiny_sdxl_path, "K_EULER", TRAILING, BASE, (5, 6))
    for a, b in zip(ours, theirs, strict=True):
        assert_same_pixels(a, b)
    leading = sdxl.generate([BASE])[0][0]
    assert np.abs(_px(ours[0]) - _px(leading)).mean() > 5
    assert lightning.describe()["scheduler_options"] == TRAILING
    assert {s.config.timestep_spacing for s in lightning._schedulers.values()} == {"trailing"}


@pytest.mark.parametrize("scheduler", ["DPM++2MSDE", "LCM", "DPM++2MSDEKarras"])
def test_the_sde_and_lcm_schedulers_are_diffusers_own_with_each_images_generator(
        sdxl, tiny_sdxl_path, scheduler):
    """Both draw fresh noise at each step, from each image's own generator: the pixels of
    diffusers' pipeline given the same generators, whatever else shares the call."""
    request = replace(BASE, scheduler=scheduler, guidance_scale=1.5, num_outputs=2)
    ours = sdxl.generate([request, replace(request, seed=9, num_outputs=1,
                                           prompt="a blue cone")])[0]
    theirs = _diffusers(tiny_sdxl_path, scheduler, {}, request, (5, 6))
    for a, b in zip(ours, theirs, strict=True):
        assert_same_pixels(a, b)
    euler = sdxl.generate([replace(request, scheduler="K_EULER", num_outputs=1)])[0][0]
    assert np.abs(_px(ours[0]) - _px(euler)).mean() > 1


@pytest.mark.parametrize("scheduler", ["UniPC", "DEIS", "DPM++2MSDEKarras"])
def test_the_webui_schedulers_are_diffusers_own(sdxl, tiny_sdxl_path, scheduler):
    """UniPC, DEIS and DPM++ 2M SDE Karras, as AUTOMATIC1111's WebUI and ComfyUI offer
    them: diffusers' pixels with that scheduler, each another image than Euler's."""
    request = replace(BASE, scheduler=scheduler, guidance_scale=6.0, num_inference_steps=5)
    (ours,), = sdxl.generate([request])
    (theirs,) = _diffusers(tiny_sdxl_path, scheduler, {}, request, (5,))
    assert_same_pixels(ours, theirs)
    euler = sdxl.generate([replace(request, scheduler="K_EULER")])[0][0]
    assert np.abs(_px(ours) - _px(euler)).mean() > 1


def test_guidance_zero_runs_one_unet_row_per_image_and_rows_leave_with_their_pixels(
        lightning):
    batch = [BASE, replace(BASE, seed=7, num_outputs=2, prompt="a blue cone"),
             replace(BASE, seed=9, prompt="a green ball")]
    rows_of = lambda args, kwargs: args[0].shape[0]
    whole, whole_rows = withdrawing(lightning, batch, None, lightning.pipe.unet, rows_of)
    out, rows = withdrawing(lightning, batch, 2, lightning.pipe.unet, rows_of)
    assert whole_rows == [4] * 4 and rows == [4, 4, 2, 2]
    assert [len(images) for images in out] == [1, 0, 1]
    for i in (0, 2):
        assert_same_pixels(out[i][0], whole[i][0])
        assert_same_pixels(out[i][0], lightning.generate([batch[i]])[0][0])


def test_a_sample_predicting_unet_is_read_as_one(tiny_sdxl_path):
    """Lightning's 1-step UNet predicts the sample: with that prediction type every
    scheduler reads the UNet's output as the image, as diffusers' pipeline does."""
    from deployments.engines.sdxl import SDXLEngine

    options = {"timestep_spacing": "trailing", "prediction_type": "sample"}
    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu", scheduler_options=options)
    request = replace(BASE, num_inference_steps=1)
    ours = engine.generate([request])[0][0]
    assert_same_pixels(ours, _diffusers(tiny_sdxl_path, "K_EULER", options, request, (5,))[0])


def test_the_config_takes_scheduler_options_for_sdxl_only_and_the_version_pins_them(tmp_path):
    from serve.versions import version_id

    def model(**fields):
        return ModelConfig(id="a/b", embedded="tiny-sdxl", **fields)

    plain, trailing = model(), model(scheduler_options=TRAILING)
    assert trailing.scheduler_options.given() == TRAILING and plain.scheduler_options.given() == {}
    sample = model(scheduler_options=TRAILING | {"prediction_type": "sample"})
    assert len({version_id(m, tmp_path) for m in (plain, trailing, sample)}) == 3
    with pytest.raises(ConfigError, match="scheduler_options: FLUX's"):
        parse_config({"models": [{"id": "a/f", "family": "flux", "embedded": "tiny-flux",
                                  "scheduler_options": TRAILING}]})
    with pytest.raises(ConfigError, match="timestep_spacing"):
        parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl",
                                  "scheduler_options": {"timestep_spacing": "last"}}]})
    lightning = parse_config({"models": [{
        "id": "a/b", "embedded": "tiny-sdxl", "scheduler_options": TRAILING,
        "defaults": {"num_inference_steps": 4, "guidance_scale": 0,
                     "scheduler": "DPM++2MSDE"}}]}).models[0]
    request = GenerationRequest.for_model(lightning, "a lamp")
    assert (request.scheduler, request.guidance_scale, request.num_inference_steps) == (
        "DPM++2MSDE", 0, 4)


def test_the_engine_the_config_makes_uses_its_scheduler_options(cache_dir, lightning):
    from deployments.engines import create_engine

    engine = create_engine(ModelConfig(id="a/b", embedded="tiny-sdxl",
                                       scheduler_options=TRAILING), cache_dir, None)
    assert engine.describe()["scheduler_options"] == TRAILING
    assert np.array_equal(_px(engine.generate([BASE])[0][0]),
                          _px(lightning.generate([BASE])[0][0]))
