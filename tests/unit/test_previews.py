"""Partial images taken while a call denoises: which steps, what they show, and that the
rest of the call is untouched."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from deployments.engines.previews import Previews, preview_steps
from deployments.engines.withdrawal import BatchRows
from serve.types import SCHEDULERS, GenerationRequest


def test_partial_images_are_spread_over_the_steps_before_the_last():
    assert preview_steps(3, 20) == {5, 10, 15}
    assert preview_steps(2, 30) == {10, 20}
    assert preview_steps(3, 4) == {1, 2, 3}
    assert preview_steps(3, 2) == {1}  # fewer steps than asked: fewer partial images
    assert preview_steps(1, 1) == set() and preview_steps(0, 20) == set()


def _scheduler(name):
    from deployments.engines.sdxl_schedulers import SDXL_SCHEDULERS

    if name == "FlowMatchEuler":
        return FlowMatchEulerDiscreteScheduler()
    cls, extra = SDXL_SCHEDULERS[name]
    return cls(**extra)


@pytest.mark.parametrize("name", [*[s for s in SCHEDULERS if s not in ("PNDM", "DEIS")],
                                  "FlowMatchEuler"])
def test_with_a_perfect_denoiser_every_samplers_estimate_is_the_clean_latents(name):
    """Noise a known x0 to the first step's level and hand the sampler the true noise (or
    velocity): the estimate kept after its step must be that x0."""
    scheduler = _scheduler(name)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 4, 8, 8, generator=gen) * 1.8 - 0.9  # within DDIM's default clipping
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    t = scheduler.timesteps[:1]
    if name == "FlowMatchEuler":
        sample, output = scheduler.scale_noise(x0, t, noise), noise - x0
    else:
        sample, output = scheduler.add_noise(x0, noise, t), noise
    previews = Previews([1], BatchRows([2]), None, None, None)
    pipe = SimpleNamespace(scheduler=scheduler)
    with previews.tapping(pipe):
        scheduler.step(output, scheduler.timesteps[0], sample, return_dict=False)
        estimate = previews._estimate
    assert torch.allclose(estimate.float(), x0, atol=1e-3), (estimate - x0).abs().max()
    assert "step" not in vars(scheduler)  # the sampler's own step is back


@pytest.mark.parametrize("name", ["PNDM", "DEIS"])
def test_pndm_and_deis_have_no_estimate_and_previews_fall_back_to_the_latents(name):
    scheduler = _scheduler(name)
    scheduler.set_timesteps(10)
    previews = Previews([1], BatchRows([1]), None, None, None)
    with previews.tapping(SimpleNamespace(scheduler=scheduler)):
        scheduler.step(torch.zeros(1, 4, 8, 8), scheduler.timesteps[0], torch.ones(1, 4, 8, 8),
                       return_dict=False)
        assert previews._estimate is None


def _req(seed, **overrides):
    base = {"model": "a/b", "prompt": "a red cube", "width": 64, "height": 64, "num_inference_steps": 8,
                "guidance_scale": 7.5, "seed": seed, "scheduler": "K_EULER"}
    return GenerationRequest(**{**base, **overrides})


def _px(image):
    return np.asarray(image).astype(int)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_partial_images_come_at_their_steps_and_leave_every_final_image_as_it_was(
        family, request):
    engine = request.getfixturevalue(family)
    extra = {} if family == "sdxl" else {"scheduler": "FlowMatchEuler", "guidance_scale": 3.5,
                                          "width": 64, "height": 64}
    batch = [_req(1, partial_images=3, num_outputs=2, **extra), _req(2, **extra),
             _req(3, partial_images=1, prompt="a blue cone", **extra)]
    plain = engine.generate([_req(1, num_outputs=2, **extra), _req(2, **extra),
                             _req(3, prompt="a blue cone", **extra)])
    steps, got = [], []
    out = engine.generate(batch, on_step=lambda s, t: steps.append(s),
                          on_preview=lambda i, images: got.append((i, len(steps), images)))
    assert [(i, step, len(images)) for i, step, images in got] == [
        (0, 2, 2), (0, 4, 2), (2, 4, 1), (0, 6, 2)]
    assert all(im.size == (64, 64) for _, _, images in got for im in images)
    for mine, before in zip(out, plain, strict=True):
        for a, b in zip(mine, before, strict=True):
            assert np.abs(_px(a) - _px(b)).max() <= 1
    # The estimates head for the result: the last partial image is nearer to it.
    first, last = got[0][2][0], got[-1][2][0]
    final = _px(out[0][0])
    assert np.abs(_px(last) - final).mean() < np.abs(_px(first) - final).mean()


def test_a_withdrawn_request_gets_no_more_partial_images(sdxl):
    got, steps = [], []
    sdxl.generate([_req(1, partial_images=3), _req(2, partial_images=3)],
                  withdrawn=lambda: {0} if len(steps) >= 3 else set(),
                  on_step=lambda s, t: steps.append(s),
                  on_preview=lambda i, images: got.append((i, len(steps))))
    assert got == [(0, 2), (1, 2), (1, 4), (1, 6)]


def test_a_partial_image_that_fails_is_skipped_and_the_call_goes_on(sdxl, monkeypatch):
    plain = sdxl.generate([_req(4)])

    def failing(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(sdxl, "_decode_latents", failing)
    got = []
    out = sdxl.generate([_req(4, partial_images=3)], on_preview=lambda i, ims: got.append(i))
    assert got == [] and np.abs(_px(out[0][0]) - _px(plain[0][0])).max() <= 1
