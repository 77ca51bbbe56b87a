"""Tiled VAE (`vae_tiling`), on the tiny SDXL and FLUX (CPU), whose VAEs' sample size is
64 pixels: larger images are decoded as diffusers' enable_tiling decodes them, smaller
ones and tiling images whole; the config's flag reaches the engine and the version."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from serve.config import ModelConfig
from serve.types import GenerationRequest
from serve.versions import version_id
from tests.unit.test_engine import _px, assert_same_pixels

REQUEST = GenerationRequest(model="a/b", prompt="a castle on a hill", width=128, height=96,
                            num_inference_steps=3, guidance_scale=6.0, seed=5,
                            scheduler="K_EULER")


@pytest.fixture(scope="module")
def tiled(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu")
    engine.tile_vae()
    return engine


def test_a_large_image_is_decoded_in_tiles_as_diffusers_does(tiled, sdxl, tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    ours = tiled.generate([REQUEST])[0][0]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    theirs = pipe(prompt=REQUEST.prompt, width=128, height=96, num_inference_steps=3,
                  guidance_scale=6.0, generator=torch.Generator().manual_seed(5)).images[0]
    assert_same_pixels(ours, theirs)
    whole = sdxl.generate([REQUEST])[0][0]
    assert np.abs(_px(ours) - _px(whole)).max() > 0  # the tiles blend: not the whole decode
    assert (tiled.describe()["vae_tiling"], sdxl.describe()["vae_tiling"]) == (True, False)


def test_small_and_tiling_images_are_decoded_whole(tiled, sdxl):
    small = replace(REQUEST, width=64, height=64)
    assert np.array_equal(_px(tiled.generate([small])[0][0]), _px(sdxl.generate([small])[0][0]))
    wrapping = replace(REQUEST, tiling=True)
    assert np.array_equal(_px(tiled.generate([wrapping])[0][0]),
                          _px(sdxl.generate([wrapping])[0][0]))
    assert tiled.pipe.vae.use_tiling  # (back on after the tiling call)


def test_flux_decodes_in_tiles_as_diffusers_does(tiny_flux_path, flux):
    from diffusers import FluxPipeline

    from deployments.engines.flux import FluxEngine
    from deployments.tiny_flux import T5_TOKENS

    engine = FluxEngine(tiny_flux_path, "float32", "cpu")
    engine.tile_vae()
    request = replace(REQUEST, scheduler="FlowMatchEuler", guidance_scale=3.5)
    ours = engine.generate([request])[0][0]
    pipe = FluxPipeline.from_pretrained(tiny_flux_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    theirs = pipe(prompt=REQUEST.prompt, width=128, height=96, num_inference_steps=3,
                  guidance_scale=3.5, max_sequence_length=T5_TOKENS,
                  generator=torch.Generator().manual_seed(5)).images[0]
    assert_same_pixels(ours, theirs)
    assert np.abs(_px(ours) - _px(flux.generate([request])[0][0])).max() > 0


def test_the_configs_flag_tiles_the_engines_vae_and_is_part_of_the_version(cache_dir,
                                                                            tmp_path):
    from deployments.engines import create_engine

    model = ModelConfig(id="a/b", embedded="tiny-sdxl", dtype="float32", vae_tiling=True)
    assert create_engine(model, cache_dir, None).describe()["vae_tiling"] is True
    plain = model.model_copy(update={"vae_tiling": False})
    assert version_id(model, tmp_path) != version_id(plain, tmp_path)
