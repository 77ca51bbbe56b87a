"""Requests with different guidance scales and rescales share SDXL calls, each image
guided by its own request's (tiny SDXL, CPU): the products row by row, the batch keys,
the images against calls of their own, withdrawal, img2img, inpainting, the guidance
rescale, ControlNets (whose rescale is a hook) and the hires pass."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from deployments.engines.row_guidance import (
    RowFactor,
    RowGuidance,
    call_guidance,
    call_rescale,
    per_image,
)
from deployments.engines.withdrawal import BatchRows
from serve.types import GenerationRequest
from tests.unit.test_engine import _px, assert_each_as_alone, assert_same_pixels, withdrawing
from tests.unit.test_img2img import MASK, A
from tests.unit.test_img2img import _req as _source_req

BASE = GenerationRequest(model="a/b", prompt="a red cube", width=64, height=64,
                         num_inference_steps=5, guidance_scale=7.5, seed=5,
                         scheduler="K_EULER")


@pytest.fixture(scope="module")
def engine(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float32", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [7.3, 5.0, 8.123456789])
def test_each_row_is_multiplied_exactly_as_the_scalar_multiplies_it(dtype, scale):
    torch.manual_seed(0)
    text, uncond = torch.randn(2, 3, 4, 8, 8).to(dtype)
    rows = BatchRows([1, 2])
    mixed = RowGuidance([scale, 2.5], rows)
    guided = uncond + mixed * (text - uncond)
    assert guided.dtype == dtype
    assert torch.equal(guided[:1], uncond[:1] + scale * (text[:1] - uncond[:1]))
    assert torch.equal(guided[1:], uncond[1:] + 2.5 * (text[1:] - uncond[1:]))


def test_the_scales_follow_the_rows_left_and_compare_as_the_first():
    rows = BatchRows([1, 2, 1])
    mixed = call_guidance([5.0, 9.0, 3.0], rows)
    assert isinstance(mixed, RowGuidance) and mixed > 1 and float(mixed) == 5.0
    assert per_image(mixed.scales, rows) == [5.0, 9.0, 9.0, 3.0]
    rows.drop({1})
    assert (mixed * torch.ones(2, 1)).flatten().tolist() == [5.0, 3.0]
    with pytest.raises(ValueError, match="3 rows multiplied as 2 image rows"):
        _ = mixed * torch.ones(3, 1)
    with pytest.raises(ValueError, match="all guided"):
        RowGuidance([5.0, 1.0], BatchRows([1, 1]))
    assert type(call_guidance([7.5, 7.5], BatchRows([1, 1]))) is float


def test_guided_requests_of_any_scale_share_a_call_and_unguided_ones_do_not(engine):
    keys = {g: engine.batch_key(replace(BASE, guidance_scale=g)) for g in (1.0, 0.0, 5.0, 9.0)}
    assert keys[5.0] == keys[9.0] and keys[1.0] == keys[0.0] and keys[1.0] != keys[5.0]


def test_each_image_in_a_shared_call_is_guided_by_its_own_scale(engine):
    batch = [BASE, replace(BASE, guidance_scale=9.0, seed=6, num_outputs=2),
             replace(BASE, guidance_scale=3.0, seed=7, prompt="a blue ball")]
    alone = assert_each_as_alone(engine, batch, engine.generate(batch))
    # The scales matter: the same seed and prompt at 9 is another image than at 7.5, over
    # one level away on 44 % of its values (a shared call's images are within one level).
    other = engine.generate([replace(BASE, guidance_scale=9.0)])[0][0]
    assert (np.abs(_px(other) - _px(alone[0][0])) > 1).mean() > 0.2


def test_a_withdrawn_request_leaves_and_the_others_keep_their_scales(engine):
    batch = [BASE, replace(BASE, guidance_scale=9.0, seed=6, num_outputs=2),
             replace(BASE, guidance_scale=3.0, seed=7)]
    out, rows = withdrawing(engine, batch, 2, engine.pipe.unet,
                            lambda args, kwargs: args[0].shape[0])
    assert [len(images) for images in out] == [1, 0, 1]
    assert rows[0] == 8 and rows[-1] == 4  # two guidance rows per image: 4 images, then 2
    assert_same_pixels(out[0][0], engine.generate([batch[0]])[0][0])
    assert_same_pixels(out[2][0], engine.generate([batch[2]])[0][0])


@pytest.mark.parametrize("mask", [None, MASK], ids=["img2img", "inpaint"])
def test_img2img_and_inpainting_calls_give_each_image_its_own_scale(engine, mask):
    batch = [_source_req(A, 0.7, mask), _source_req(A, 0.7, mask, guidance_scale=11.0, seed=8)]
    assert engine.batch_key(batch[0]) == engine.batch_key(batch[1])
    together = engine.generate(batch)
    for shared, request in zip(together, batch, strict=True):
        assert_same_pixels(shared[0], engine.generate([request])[0][0])


def test_a_rescaled_guidance_is_rescaled_from_each_rows_own_scale(engine):
    batch = [replace(BASE, guidance_rescale=0.7),
             replace(BASE, guidance_rescale=0.7, guidance_scale=12.0, seed=9)]
    together = engine.generate(batch)
    for shared, request in zip(together, batch, strict=True):
        assert_same_pixels(shared[0], engine.generate([request])[0][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_row_is_rescaled_exactly_as_diffusers_rescales_it_alone(dtype):
    """diffusers' own `rescale_noise_cfg`, given the call's factor, gives each row what
    it gives that row with the row's own rescale; a row of rescale 0 is left as it was."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        rescale_noise_cfg,
    )

    torch.manual_seed(0)
    guided, text = torch.randn(2, 4, 4, 8, 8).to(dtype)
    rows = BatchRows([1, 2, 1])
    mixed = call_rescale([0.7, 0.0, 0.3], rows)
    assert isinstance(mixed, RowFactor) and float(mixed) == 0.7 and mixed > 0.0
    out = rescale_noise_cfg(guided, text, guidance_rescale=mixed)
    assert out.dtype == dtype
    assert torch.equal(out[:1], rescale_noise_cfg(guided[:1], text[:1], guidance_rescale=0.7))
    assert torch.equal(out[1:3], guided[1:3])
    assert torch.equal(out[3:], rescale_noise_cfg(guided[3:], text[3:], guidance_rescale=0.3))
    assert not torch.equal(out[3:], guided[3:])  # a rescale changes the row
    assert (1 - mixed).scales == pytest.approx((0.3, 1.0, 0.7))
    assert call_rescale([0.0, 0.0], rows) == 0.0 and type(call_rescale([0.5], rows)) is float
    rows.drop({0})
    assert (mixed * torch.ones(3, 1)).flatten().tolist() == [0.0, 0.0, pytest.approx(0.3)]


def test_requests_of_any_rescale_share_a_call(engine):
    keys = {r: engine.batch_key(replace(BASE, guidance_rescale=r)) for r in (0.0, 0.4, 0.7)}
    assert len(set(keys.values())) == 1
    assert BASE.shared_key != replace(BASE, guidance_rescale=0.7).shared_key


@pytest.mark.parametrize("hires", [False, True], ids=["txt2img", "hires"])
def test_each_image_in_a_shared_call_is_rescaled_by_its_own_rescale(engine, hires):
    extra = {"hires_scale": 1.5, "hires_strength": 0.5} if hires else {}
    batch = [replace(BASE, guidance_rescale=0.7, **extra),
             replace(BASE, seed=6, num_outputs=2, **extra),
             replace(BASE, guidance_rescale=0.3, guidance_scale=11.0, seed=7, **extra)]
    alone = assert_each_as_alone(engine, batch, engine.generate(batch))
    # The rescale matters: the first request's image without it is another image.
    plain = engine.generate([replace(batch[0], guidance_rescale=0.0)])[0][0]
    assert np.abs(_px(plain) - _px(alone[0][0])).mean() > 1


def test_a_withdrawn_request_leaves_and_the_others_keep_their_rescales(engine):
    batch = [replace(BASE, guidance_rescale=0.7),
             replace(BASE, guidance_rescale=0.2, seed=6, num_outputs=2),
             replace(BASE, seed=7)]
    out, rows = withdrawing(engine, batch, 2, engine.pipe.unet,
                            lambda args, kwargs: args[0].shape[0])
    assert [len(images) for images in out] == [1, 0, 1] and rows[-1] == 4
    assert_same_pixels(out[0][0], engine.generate([batch[0]])[0][0])
    assert_same_pixels(out[2][0], engine.generate([batch[2]])[0][0])
