"""FLUX's hires pass (`hires_scale`), on the tiny FLUX (CPU): diffusers' FluxPipeline, the
images upscaled (bicubic, or by an ESRGAN upscaler and an area resize), then its
FluxImg2ImgPipeline over them with the same generators; its size (multiples of 16), the
rows of a call, and the models that refuse it."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from deployments.engines.upscalers import RRDBNet, UpscalerFile
from deployments.tiny_flux import T5_TOKENS
from serve.config import ModelConfig
from serve.errors import InvalidField
from serve.types import GenerationRequest
from tests.unit.test_engine import _px, assert_same_pixels
from tests.unit.test_hires import withdrawn_in_the_second_pass

REQUEST = GenerationRequest(model="a/b", prompt="a castle on a hill", width=64, height=96,
                            num_inference_steps=4, guidance_scale=3.5, seed=8,
                            scheduler="FlowMatchEuler", hires_scale=1.5, hires_strength=0.6,
                            hires_steps=5, hires_upscaler="bicubic", hires_multiple=16)


def _diffusers_hires(engine, upscale) -> list:
    """REQUEST's two images (seeds 8 and 9) as diffusers draws them: FluxPipeline at
    64x96, `upscale(images)` to 96x144, then FluxImg2ImgPipeline over them at that size
    (which it is told: its default is the model's)."""
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    base = FluxPipeline.from_pipe(engine.pipe)
    second = FluxImg2ImgPipeline.from_pipe(engine.pipe)
    generators = [torch.Generator().manual_seed(s) for s in (8, 9)]
    args = {"prompt": REQUEST.prompt, "guidance_scale": 3.5, "generator": generators,
            "num_images_per_prompt": 2, "max_sequence_length": T5_TOKENS}
    drawn = base(width=64, height=96, num_inference_steps=4, output_type="pt", **args).images
    return second(image=upscale(drawn), strength=0.6, num_inference_steps=5, width=96,
                  height=144, **args).images


@pytest.fixture(scope="module")
def upscaling(tiny_flux_path, cache_dir):
    from deployments.engines.flux import FluxEngine
    from deployments.tiny import TINY_ESRGAN, TINY_ESRGAN_FILE, ensure_embedded

    file = ensure_embedded(TINY_ESRGAN, cache_dir) / TINY_ESRGAN_FILE
    engine = FluxEngine(tiny_flux_path, "float32", "cpu",
                        upscalers={"esrgan": UpscalerFile(file)})
    return engine, file


def test_the_output_size_is_scaled_to_a_multiple_of_16():
    assert REQUEST.output_size == (96, 144)
    flux = ModelConfig(id="a/b", family="flux", embedded="tiny-flux")
    sdxl = ModelConfig(id="a/b", embedded="tiny-sdxl")
    for model, size in ((flux, (96, 80)), (sdxl, (104, 80))):
        request = GenerationRequest.for_model(model, "x", width=80, height=64, hires_scale=1.3)
        assert request.output_size == size


@pytest.mark.parametrize("upscaler", ["bicubic", "esrgan"])
def test_the_hires_pass_is_diffusers_text_to_image_then_img2img(upscaling, upscaler):
    engine, file = upscaling
    net = RRDBNet(4, 8, 2, 4).eval()
    net.load_state_dict(torch.load(file, weights_only=True)["params_ema"])

    def upscale(drawn):
        if upscaler == "bicubic":
            return F.interpolate(drawn, size=(144, 96), mode="bicubic").clamp(0, 1)
        with torch.inference_mode():
            big = net(drawn).clamp(0, 1)
        return F.interpolate(big, size=(144, 96), mode="area").clamp(0, 1)

    theirs = _diffusers_hires(engine, upscale)
    ours = engine.generate([replace(REQUEST, num_outputs=2, hires_upscaler=upscaler)])[0]
    assert [image.size for image in ours] == [(96, 144)] * 2
    for a, b in zip(ours, theirs, strict=True):
        assert_same_pixels(a, b)
    plain = engine.generate([replace(REQUEST, hires_scale=1.0)])[0][0]
    assert plain.size == (64, 96)
    assert engine.describe()["upscalers"] == {"esrgan": "x4"}


def test_a_request_withdrawn_in_either_pass_leaves_and_the_others_keep_their_pixels(flux):
    """Withdrawn during the second pass, a request's rows leave that pipeline call (its
    pooled text and guidance picked by their places among the rows the call started
    with); withdrawn during the first, the second call starts without them. Either way the
    other keeps its pixels, and the call stops once every request has left."""
    out, untouched = withdrawn_in_the_second_pass(flux, REQUEST)
    assert out[1] == [] and len(out[0]) == 1
    assert_same_pixels(out[0][0], untouched[0][0])
    other = replace(REQUEST, prompt="a boat at sea", seed=3)
    third = replace(REQUEST, prompt="a red barn in snow", seed=5)
    rows = []
    # The rows of each transformer call: the first request leaves the first pass after
    # its 2nd step, the third the second pass after its 1st.
    hook = flux.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]),
        with_kwargs=True)
    try:
        both = flux.generate([other, REQUEST, third], withdrawn=lambda: (
            {0, 2} if len(rows) >= 5 else {0} if len(rows) >= 2 else set()))
    finally:
        hook.remove()
    assert both[0] == both[2] == [] and rows == [3, 3, 2, 2, 2, 1, 1]
    assert_same_pixels(both[1][0], untouched[0][0])
    steps = []
    gone = flux.generate([REQUEST], withdrawn=lambda: {0} if len(steps) >= 2 else set(),
                         on_step=lambda s, t: steps.append((s, t)))
    assert gone == [[]] and steps == [(1, 4), (2, 4)]
    assert np.abs(_px(untouched[0][0]) - _px(untouched[1][0])).mean() > 1


def test_the_flux_tools_run_no_hires_pass():
    assert ModelConfig(id="a/b", family="flux", embedded="tiny-flux").options()["hires"]
    for tool in ("kontext", "fill", "canny", "depth"):
        estimator = {"depth_estimator": {"embedded": "tiny-depth-anything"}}
        model = ModelConfig(id="a/b", family="flux", embedded=f"tiny-flux-{tool}",
                            **{tool: True}, **(estimator if tool == "depth" else {}))
        assert model.options()["hires"] is False, tool
    kontext = ModelConfig(id="a/b", family="flux", embedded="tiny-flux-kontext", kontext=True)
    with pytest.raises(InvalidField, match="no second pass") as refused:
        GenerationRequest.for_model(kontext, "x", hires_scale=1.5)
    assert refused.value.field == "hires_scale"
