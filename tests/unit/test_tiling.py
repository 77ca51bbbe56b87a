"""Tiling images (`tiling`) on the tiny SDXL (CPU). With circular convolutions the whole
pipeline commutes with shifting the picture around its edges (SDXL's UNet and VAE have no
positional embeddings), which is what makes its images tile: shifting the starting noise
shifts the image, wrapping round, with no seam anywhere."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from serve.config import ModelConfig
from serve.errors import InvalidField
from serve.types import GenerationRequest, SourceImage
from tests.unit.test_engine import _px, assert_same_pixels

REQUEST = GenerationRequest(model="a/b", prompt="a mosaic", width=64, height=64,
                            num_inference_steps=3, guidance_scale=6.0, seed=4,
                            scheduler="K_EULER", tiling=True)


def _shifted_pair(engine, tiling: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """The engine's pipeline from noise, and from that noise shifted round by one UNet
    downsampling step (both axes); the pixels of each and the image's shift."""
    pipe = engine.pipe
    factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    request = replace(REQUEST, tiling=tiling)
    images = []
    for latents in (noise, noise.roll((factor, factor), dims=(2, 3))):
        with engine._tiled(pipe, request):
            out = pipe(prompt=request.prompt, width=64, height=64, num_inference_steps=3,
                       guidance_scale=6.0, latents=latents, output_type="np").images[0]
        images.append((out * 255).round())
    return images[0], images[1], factor * pipe.vae_scale_factor


def test_a_tiling_image_shifts_round_with_its_noise_and_an_untiled_one_does_not(sdxl):
    image, shifted, by = _shifted_pair(sdxl, tiling=True)
    assert np.abs(np.roll(image, (by, by), axis=(0, 1)) - shifted).max() <= 2
    image, shifted, by = _shifted_pair(sdxl, tiling=False)
    assert np.abs(np.roll(image, (by, by), axis=(0, 1)) - shifted).mean() > 5


def test_tiling_draws_diffusers_pixels_with_circular_convolutions(sdxl, tiny_sdxl_path):
    """The reference: diffusers' pipeline with every convolution of its UNet and VAE
    padding circularly, as AUTOMATIC1111's WebUI sets them; the engine's own convolutions
    pad with zeros again after the call."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for model in (pipe.unet, pipe.vae):
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.padding_mode = "circular"
    theirs = pipe(prompt=REQUEST.prompt, width=64, height=64, num_inference_steps=3,
                  guidance_scale=6.0, generator=torch.Generator().manual_seed(4)).images[0]
    ours = sdxl.generate([REQUEST])[0][0]
    assert_same_pixels(ours, theirs)
    plain = sdxl.generate([replace(REQUEST, tiling=False)])[0][0]
    assert np.abs(_px(ours) - _px(plain)).mean() > 1
    modes = {m.padding_mode for m in sdxl.pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)}
    assert modes == {"zeros"}


def test_img2img_tiles_and_tiling_requests_run_apart(sdxl):
    picture = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    moved = replace(REQUEST, source=SourceImage(picture.tobytes(), 0.6))
    tiled = sdxl.generate([moved])[0][0]
    assert np.abs(_px(tiled) - _px(sdxl.generate([replace(moved, tiling=False)])[0][0])
                  ).mean() > 1
    assert sdxl.batch_key(REQUEST) != sdxl.batch_key(replace(REQUEST, tiling=False))


def test_flux_refuses_tiling_and_sdxl_takes_it():
    flux = ModelConfig(id="a/f", family="flux", embedded="tiny-flux")
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(flux, "x", tiling=True)
    assert refused.value.field == "tiling" and "FLUX" in refused.value.reason
    sdxl = ModelConfig(id="a/b", embedded="tiny-sdxl")
    assert GenerationRequest.for_model(sdxl, "x", tiling=True).tiling


def test_a_compiled_engine_runs_tiling_calls_uncompiled(tiny_sdxl_path, sdxl, compile_cache):
    """Compiled (any way), a tiling call compiles nothing: its convolutions pad otherwise."""
    from torch._dynamo.utils import counters

    from deployments.engines.sdxl import SDXLEngine
    from serve.config import SpeedConfig

    compiled = SDXLEngine(tiny_sdxl_path, "float32", "cpu", compile_cache=compile_cache,
                          speed=SpeedConfig(compile=True))
    compiled.warm_up(replace(REQUEST, tiling=False, num_inference_steps=1))
    warmed = counters["stats"]["calls_captured"]
    (image,), = compiled.generate([REQUEST])
    assert counters["stats"]["calls_captured"] == warmed
    assert np.abs(_px(image) - _px(sdxl.generate([REQUEST])[0][0])).max() <= 2


def test_a_tiling_image_is_upscaled_as_one_that_wraps_around():
    """For the hires pass: resized as the middle of its 3 x 3 tiling, shifting the image
    round by 4 pixels shifts the 1.5x one round by 6; resized plainly, it does not."""
    from deployments.engines.tiling import resized

    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for mode in ("bicubic", "bilinear"):
        big = resized(image, (96, 96), mode, wrap=True)
        shifted = resized(image.roll((4, 4), dims=(2, 3)), (96, 96), mode, wrap=True)
        torch.testing.assert_close(shifted, big.roll((6, 6), dims=(2, 3)))
        plain = resized(image, (96, 96), mode)
        assert torch.equal(plain, torch.nn.functional.interpolate(image, size=(96, 96),
                                                                  mode=mode))
        shifted = resized(image.roll((4, 4), dims=(2, 3)), (96, 96), mode)
        assert (shifted - plain.roll((6, 6), dims=(2, 3))).abs().max() > 0.05


def test_a_tiling_hires_call_draws_its_own_larger_image(sdxl):
    larger = replace(REQUEST, hires_scale=1.5, hires_strength=0.6)
    (tiled,), = sdxl.generate([larger])
    (plain,), = sdxl.generate([replace(larger, tiling=False)])
    assert tiled.size == plain.size == (96, 96)
    assert np.abs(_px(tiled) - _px(plain)).mean() > 1
