"""speed.cfg_cutoff on the tiny SDXL (CPU): classifier-free guidance stops after a fraction
of the steps. Diffusers' own SDXLCFGCutoffCallback (one image) is the reference."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from serve.config import ModelConfig, SpeedConfig
from serve.types import GenerationRequest, SourceImage

REQUEST = GenerationRequest(model="m", prompt="a red cube", width=64, height=64,
                            num_inference_steps=10, guidance_scale=6, seed=3,
                            scheduler="K_EULER")


@pytest.fixture(scope="module")
def engines(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    return (SDXLEngine(tiny_sdxl_path, "float32", "cpu"),
            SDXLEngine(tiny_sdxl_path, "float32", "cpu", speed=SpeedConfig(cfg_cutoff=0.4)))


def _px(image):
    return np.asarray(image).astype(int)


def _close(a, b):
    diff = np.abs(_px(a) - _px(b))
    return diff.max() <= 1 and (diff > 0).mean() < 0.01


def _unet_rows(engine, requests, **kwargs):
    rows = []
    hook = engine.pipe.unet.register_forward_pre_hook(lambda m, args: rows.append(
        args[0].shape[0]))
    try:
        return engine.generate(requests, **kwargs), rows
    finally:
        hook.remove()


def test_one_image_has_the_pixels_of_diffusers_cutoff_callback(engines, tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.callbacks import SDXLCFGCutoffCallback

    full, cut = engines
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(prompt="a red cube", width=64, height=64, num_inference_steps=10,
                     guidance_scale=6, generator=[torch.Generator("cpu").manual_seed(3)],
                     callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.4)
                     ).images[0]
    (ours,), rows = _unet_rows(cut, [REQUEST])
    assert _close(ours[0], reference)
    # The tiny random UNet's guided and unguided predictions differ little: a small change.
    assert np.abs(_px(ours[0]) - _px(full.generate([REQUEST])[0][0])).mean() > 0.05
    # Steps 0-4 guided (two UNet rows), the 5 after it one row: 15 rows instead of 20.
    assert rows == [2] * 5 + [1] * 5


def test_a_seed_gives_the_same_image_alone_or_batched_and_withdrawals_still_work(engines):
    _, cut = engines
    alone = cut.generate([REQUEST])[0][0]
    batch = [replace(REQUEST, seed=8, prompt="a blue cone", num_outputs=2), REQUEST,
             replace(REQUEST, seed=9, prompt="a green ball")]
    steps = []
    out, rows = _unet_rows(cut, batch, withdrawn=lambda: {0} if len(steps) >= 7 else set(),
                           on_step=lambda s, t: steps.append(s))
    assert _close(out[1][0], alone) and [len(images) for images in out] == [0, 1, 1]
    # 4 images guided for 5 steps, unguided for 2, then 2 images after the withdrawal.
    assert rows == [8] * 5 + [4] * 2 + [2] * 3


def test_inpainting_keeps_guidance_on_every_step(engines):
    full, cut = engines
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    inpaint = replace(REQUEST, source=SourceImage(Image.fromarray(pixels).tobytes(), 0.8,
                                                  Image.fromarray(mask).tobytes()))
    (ours,), rows = _unet_rows(cut, [inpaint])
    assert set(rows) == {2}
    assert np.array_equal(_px(ours[0]), _px(full.generate([inpaint])[0][0]))


def test_the_warm_up_reaches_the_unguided_steps(engines):
    _, cut = engines
    rows = []
    hook = cut.pipe.unet.register_forward_pre_hook(lambda m, args: rows.append(
        args[0].shape[0]))
    try:
        cut.warm_up(replace(REQUEST, num_inference_steps=2), max_images=2)
    finally:
        hook.remove()
    assert 1 in rows and 2 in rows and 4 in rows  # unguided calls of 1 and 2 images


def test_the_cutoff_is_an_sdxl_setting_between_0_and_1():
    with pytest.raises(ValueError, match="only sdxl models use classifier-free guidance"):
        ModelConfig(id="acme/flux", family="flux", embedded="tiny-flux",
                    speed=SpeedConfig(cfg_cutoff=0.5))
    for value in (0, 1, 1.5):
        with pytest.raises(ValueError, match="cfg_cutoff"):
            SpeedConfig(cfg_cutoff=value)


def test_compiled_blocks_follow_the_batch_halving_mid_call(engines, tiny_sdxl_path, compile_cache):
    from deployments.engines.sdxl import SDXLEngine

    _, cut = engines
    fast = SDXLEngine(tiny_sdxl_path, "float32", "cpu", compile_cache=compile_cache,
                      speed=SpeedConfig(compile=True, cfg_cutoff=0.4))
    batch = [REQUEST, replace(REQUEST, seed=8, num_outputs=2)]
    for a, b in zip([i for own in cut.generate(batch) for i in own],
                    [i for own in fast.generate(batch) for i in own]):
        diff = np.abs(_px(a) - _px(b))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.02, (diff.max(), diff.mean())


def test_images_of_different_guidance_scales_share_a_cut_off_call(engines):
    cut = engines[1]
    other = replace(REQUEST, guidance_scale=11.0, seed=4)
    assert cut.batch_key(REQUEST) == cut.batch_key(other)
    together, rows = _unet_rows(cut, [REQUEST, other])
    assert rows == [4] * 5 + [2] * 5  # guided to step index int(10 x 0.4), then a row an image
    for request, shared in zip((REQUEST, other), together, strict=True):
        assert _close(shared[0], cut.generate([request])[0][0])
