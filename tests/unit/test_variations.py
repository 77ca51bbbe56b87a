"""Seed variations (`variation_seed`, `variation_strength`) on the tiny SDXL and FLUX (CPU):
at 0 the seed's image exactly, at 1 the variation seed's, close to the seed's at small
strengths; FLUX's noise mixed before its patches are packed (diffusers' pixels from the
same noise); rows with and without a variation share calls; and the requests it refuses."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from deployments.engines.variations import slerp
from deployments.tiny_flux import T5_TOKENS
from serve.config import ModelConfig
from serve.errors import InvalidField
from serve.types import GenerationRequest, SourceImage
from tests.unit.test_engine import _px, assert_same_pixels

FLUX_REQUEST = GenerationRequest(model="a/f", prompt="a red cube", width=64, height=48,
                                 num_inference_steps=3, guidance_scale=3.5, seed=4,
                                 scheduler="FlowMatchEuler", variation_seed=40)
REQUEST = GenerationRequest(model="a/b", prompt="a red cube", width=64, height=64,
                            num_inference_steps=4, guidance_scale=6.0, seed=4,
                            scheduler="K_EULER", variation_seed=40)


def _image(engine, **changes):
    return engine.generate([replace(REQUEST, **changes)])[0][0]


@pytest.mark.parametrize("scheduler", ["K_EULER", "K_EULER_ANCESTRAL", "DPM++2MSDE"])
def test_strength_zero_is_the_seeds_own_image_even_where_steps_draw_noise(sdxl, scheduler):
    """The starting noise is drawn from each image's generator as diffusers draws it, so
    the generator goes on to the steps' noise (ancestral and SDE samplers) unchanged."""
    plain = _image(sdxl, scheduler=scheduler, variation_seed=None)
    assert_same_pixels(_image(sdxl, scheduler=scheduler, variation_strength=0.0), plain)
    assert np.abs(_px(_image(sdxl, scheduler=scheduler, variation_strength=0.3))
                  - _px(plain)).mean() > 0.5


def test_strength_one_is_the_variation_seeds_image_and_small_ones_stay_close(sdxl):
    own, other = _image(sdxl, variation_seed=None), _image(sdxl, seed=40, variation_seed=None)
    assert np.abs(_px(_image(sdxl, variation_strength=1.0)) - _px(other)).max() <= 1
    gaps = [np.abs(_px(_image(sdxl, variation_strength=s)) - _px(own)).mean()
            for s in (0.05, 0.3, 0.7)]
    assert 0 < gaps[0] < gaps[1] < gaps[2]


def test_each_image_of_a_request_varies_towards_its_own_variation_seed(sdxl):
    two = sdxl.generate([replace(REQUEST, num_outputs=2, variation_strength=1.0)])[0]
    assert np.abs(_px(two[1]) - _px(_image(sdxl, seed=41, variation_seed=None))).max() <= 1


def test_rows_with_and_without_a_variation_share_a_call_with_their_own_pixels(sdxl):
    varied = replace(REQUEST, variation_strength=0.4)
    plain = replace(REQUEST, seed=9, variation_seed=None, prompt="a blue cone")
    together = sdxl.generate([varied, plain])
    assert np.abs(_px(together[0][0]) - _px(sdxl.generate([varied])[0][0])).max() <= 1
    assert np.abs(_px(together[1][0]) - _px(sdxl.generate([plain])[0][0])).max() <= 1


def test_flux_mixes_the_seeds_noise_before_packing_it_into_tokens(flux, tiny_flux_path):
    """0: the seed's image; 1: the variation seed's; 0.4: diffusers' FluxPipeline given the
    two seeds' noise (16 x 6 x 8 latents for 64 x 48) mixed, then packed 2x2 into tokens;
    rows with and without a variation keep their own pixels in one call."""
    from diffusers import FluxPipeline

    def drawn(*requests):
        return [images[0] for images in flux.generate([replace(FLUX_REQUEST, **r)
                                                        for r in requests])]

    own, other = drawn({"variation_seed": None}, {"seed": 40, "variation_seed": None})
    assert_same_pixels(drawn({"variation_strength": 0.0})[0], own)
    assert np.abs(_px(drawn({"variation_strength": 1.0})[0]) - _px(other)).max() <= 1
    varied, plain = drawn({"variation_strength": 0.4}, {"variation_seed": None})
    assert_same_pixels(plain, own)
    noise = [torch.randn((1, 16, 6, 8), generator=torch.Generator().manual_seed(seed))
             for seed in (4, 40)]
    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    latents = pipe._pack_latents(slerp(0.4, *noise), 1, 16, 6, 8)
    theirs = pipe(prompt=FLUX_REQUEST.prompt, width=64, height=48, num_inference_steps=3,
                  guidance_scale=3.5, max_sequence_length=T5_TOKENS, latents=latents,
                  generator=torch.Generator().manual_seed(4)).images[0]
    assert np.abs(_px(varied) - _px(theirs)).max() <= 1
    assert np.abs(_px(varied) - _px(own)).mean() > 0.5


def test_replicates_schema_offers_variations_only_to_models_that_draw_them():
    from serve.routes.replicate_schemas import input_schema

    def inputs(**config):
        return set(input_schema(ModelConfig(id="a/b", **config))["properties"])

    assert {"variation_seed", "variation_strength", "hires_scale",
            "tiling"} <= inputs(embedded="tiny-sdxl")
    assert {"variation_seed", "variation_strength"} <= inputs(family="flux",
                                                              embedded="tiny-flux")
    inpainting = inputs(embedded="tiny-sdxl-inpainting", inpainting=True)
    assert "tiling" in inpainting and not inpainting & {"variation_seed", "hires_scale"}


def test_slerp_keeps_the_ends_and_the_norm_between_them():
    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.equal(slerp(0.0, a, b), a)
    torch.testing.assert_close(slerp(1.0, a, b), b)
    middle = slerp(0.5, a, b)
    assert abs(middle.norm() - (a.norm() + b.norm()) / 2) < 0.1 * a.norm()
    torch.testing.assert_close(slerp(0.5, a, a), a)  # parallel: linear


@pytest.mark.parametrize(("args", "field", "reason"), [
    ({"variation_strength": 0.2}, "variation_seed", "needed"),
    ({"variation_strength": 0.2, "variation_seed": 3,
      "source": SourceImage(bytes(64 * 64 * 3), 0.5)}, "variation_strength", "input image"),
])
def test_variations_beyond_text_to_image_or_without_a_seed_are_refused(args, field, reason):
    model = ModelConfig(id="a/b", embedded="tiny-sdxl")
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(model, "x", width=64, height=64, **args)
    assert refused.value.field == field and reason in refused.value.reason
    fill = ModelConfig(id="a/k", family="flux", embedded="tiny-flux-fill", fill=True)
    masked = SourceImage(bytes(64 * 64 * 3), 1.0, mask=bytes([255]) * 64 * 64)
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(fill, "x", width=64, height=64, source=masked,
                                    variation_strength=0.2, variation_seed=1)
    assert refused.value.field == "variation_strength" and "FLUX" in refused.value.reason
    kontext = ModelConfig(id="a/k", family="flux", embedded="tiny-flux-kontext", kontext=True)
    edit = SourceImage(bytes(64 * 64 * 3), 1.0, edit=True)
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(kontext, "x", width=64, height=64, source=edit,
                                    variation_strength=0.2, variation_seed=1)
    assert refused.value.field == "variation_strength" and "input image" in refused.value.reason
    for model in (kontext, ModelConfig(id="a/f", family="flux", embedded="tiny-flux")):
        assert GenerationRequest.for_model(model, "x", variation_strength=0.2,
                                           variation_seed=1).variation_strength == 0.2
