"""SDXL's hires pass (`hires_scale`), on the tiny SDXL (CPU): the WebUI's hires. fix as
diffusers' two pipelines draw it (text-to-image, the images upscaled bicubically, img2img
over them with the same generators), its size, its calls, and the requests it refuses."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from serve.config import ModelConfig
from serve.errors import InvalidField
from serve.types import GenerationRequest, SourceImage
from tests.unit.test_engine import _px, assert_same_pixels

REQUEST = GenerationRequest(model="a/b", prompt="a castle on a hill", width=64, height=64,
                            num_inference_steps=4, guidance_scale=6.0, seed=8,
                            scheduler="K_EULER", hires_scale=1.5, hires_strength=0.6,
                            hires_steps=5)


def diffusers_hires(tiny_sdxl_path, upscale) -> list:
    """REQUEST's two images (seeds 8 and 9) as diffusers draws them: its text-to-image
    pipeline at 64x64, `upscale(images)` to 96x96, its img2img pipeline over them."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    base.set_progress_bar_config(disable=True)
    second = StableDiffusionXLImg2ImgPipeline(**base.components)
    generators = [torch.Generator().manual_seed(s) for s in (8, 9)]
    args = {"prompt": REQUEST.prompt, "guidance_scale": 6.0, "generator": generators,
            "num_images_per_prompt": 2}
    drawn = base(width=64, height=64, num_inference_steps=4, output_type="pt", **args).images
    return second(image=upscale(drawn), strength=0.6, num_inference_steps=5, **args).images


def test_the_hires_pass_is_diffusers_text_to_image_then_img2img_over_the_upscaled_images(
        sdxl, tiny_sdxl_path):
    theirs = diffusers_hires(tiny_sdxl_path, lambda drawn: torch.nn.functional.interpolate(
        drawn, size=(96, 96), mode="bicubic").clamp(0, 1))
    ours = sdxl.generate([replace(REQUEST, num_outputs=2)])[0]
    assert [image.size for image in ours] == [(96, 96)] * 2
    for a, b in zip(ours, theirs, strict=True):
        assert_same_pixels(a, b)
    plain = sdxl.generate([replace(REQUEST, hires_scale=1.0)])[0][0]
    assert plain.size == (64, 64)


def test_requests_with_the_same_pass_share_a_call_with_their_own_pixels(sdxl):
    other = replace(REQUEST, prompt="a boat at sea", seed=3)
    together = sdxl.generate([REQUEST, other])
    for alone, shared in zip((sdxl.generate([REQUEST]), sdxl.generate([other])), together):
        assert np.abs(_px(alone[0][0]) - _px(shared[0])).max() <= 1
    assert sdxl.batch_key(REQUEST) != sdxl.batch_key(replace(REQUEST, hires_strength=0.5))
    assert sdxl.batch_key(REQUEST) != sdxl.batch_key(replace(REQUEST, hires_scale=1.0))


def test_requests_of_different_guidance_scales_keep_theirs_through_both_passes(sdxl):
    other = replace(REQUEST, guidance_scale=10.0, seed=3)
    assert sdxl.batch_key(REQUEST) == sdxl.batch_key(other)
    together = sdxl.generate([REQUEST, other])
    for request, shared in zip((REQUEST, other), together, strict=True):
        assert_same_pixels(shared[0], sdxl.generate([request])[0][0])


def test_the_output_size_is_scaled_to_a_multiple_of_8():
    assert replace(REQUEST, hires_scale=1.3).output_size == (80, 80)
    assert replace(REQUEST, width=128, hires_scale=2).output_size == (256, 128)
    assert replace(REQUEST, hires_scale=1.0).output_size == (64, 64)


@pytest.mark.parametrize(("args", "field", "reason"), [
    ({"hires_scale": 2, "width": 512, "height": 512}, "hires_scale", "1024x1024"),
    ({"hires_scale": 2, "num_outputs": 4, "width": 256, "height": 256}, "num_outputs",
     "per request"),
    ({"hires_scale": 1.5, "hires_steps": 99}, "hires_steps", "at most"),
    ({"hires_scale": 1.5, "hires_strength": 0.1, "num_inference_steps": 4}, "hires_strength",
     "is none"),
    ({"hires_scale": 1.5, "refine": "base_image_refiner"}, "hires_scale", "refine"),
    ({"hires_scale": 1.5, "source": SourceImage(bytes(64 * 64 * 3), 0.5)}, "hires_scale",
     "input image"),
])
def test_hires_requests_beyond_the_model_are_refused_naming_the_field(args, field, reason):
    model = ModelConfig(id="a/b", embedded="tiny-sdxl", refiner={"embedded": "tiny-sdxl-refiner"},
                        limits={"max_size": 768, "max_pixels": 768 * 768, "max_steps": 50,
                                "max_request_pixels": 300_000},
                        defaults={"width": 64, "height": 64})
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(model, "x", **{"width": 64, "height": 64} | args)
    assert refused.value.field == field and reason in refused.value.reason
    kontext = ModelConfig(id="a/k", family="flux", embedded="tiny-flux-kontext", kontext=True)
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(kontext, "x", hires_scale=1.5)
    assert refused.value.field == "hires_scale" and "plain FLUX" in refused.value.reason


def test_a_compiled_engine_runs_a_hires_size_it_did_not_compile_uncompiled(
        tiny_sdxl_path, sdxl, compile_cache):
    from torch._dynamo.utils import counters

    from deployments.engines.sdxl import SDXLEngine
    from serve.config import SpeedConfig

    compiled = SDXLEngine(tiny_sdxl_path, "float32", "cpu", compile_cache=compile_cache,
                          speed=SpeedConfig(compile=True, batch_buckets=[1]))
    compiled.warm_up(replace(REQUEST, hires_scale=1.0, num_inference_steps=1))
    warmed = counters["stats"]["calls_captured"]
    (image,), = compiled.generate([REQUEST])
    assert counters["stats"]["calls_captured"] == warmed
    assert np.abs(_px(image) - _px(sdxl.generate([REQUEST])[0][0])).max() <= 2


def test_each_rows_adapter_set_stays_with_it_through_the_second_pass(tiny_sdxl_path,
                                                                      cache_dir):
    """LoRA slots give each row its own adapters in the hires pass as in the first: a
    request with an adapter and one without share a call with their own pixels."""
    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_SDXL_DEMO, ensure_demo_loras
    from serve.adapters import AdapterCatalog, AdapterSet

    folder = ensure_demo_loras(TINY_SDXL_DEMO, cache_dir)
    catalog = AdapterCatalog.scan([(folder, "sdxl", 1.0)]).entries
    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu", adapters=catalog, max_adapters=2,
                        max_lora_rank=8)
    styled = replace(REQUEST, adapters=AdapterSet.of([("pixel-art", 1.0)]), seed=2)
    together = engine.generate([REQUEST, styled])
    assert np.abs(_px(together[0][0]) - _px(engine.generate([REQUEST])[0][0])).max() <= 1
    alone = engine.generate([styled])[0][0]
    assert np.abs(_px(together[1][0]) - _px(alone)).max() <= 1
    plain = engine.generate([replace(styled, adapters=AdapterSet())])[0][0]
    assert np.abs(_px(alone) - _px(plain)).mean() > 1


def withdrawn_in_the_second_pass(engine, request: GenerationRequest) -> tuple[list, list]:
    """A call of `request` and another, the other withdrawn after the 5th step (in the
    second pass: the first runs 4 steps, the second 3, 5 x 0.6); its images, and theirs
    alone."""
    other = replace(request, prompt="a boat at sea", seed=3)
    untouched = engine.generate([request, other])
    steps = []
    out = engine.generate([request, other], withdrawn=lambda: {1} if len(steps) >= 5 else set(),
                          on_step=lambda s, t: steps.append((s, t)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4), (1, 3), (2, 3), (3, 3)]
    return out, untouched


def test_a_request_withdrawn_during_the_second_pass_leaves_the_others_their_pixels(sdxl):
    out, untouched = withdrawn_in_the_second_pass(sdxl, REQUEST)
    assert out[1] == [] and len(out[0]) == 1
    assert_same_pixels(out[0][0], untouched[0][0])


def test_controlnets_steer_the_second_pass_too_with_diffusers_pixels(tiny_sdxl_path,
                                                                    cache_dir):
    """The ControlNet text-to-image pipeline, then its img2img pipeline over the upscaled
    images with the control image upscaled bilinearly, the same generators throughout."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionXLControlNetImg2ImgPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_SDXL_CONTROLNET, ensure_embedded
    from serve.types import ControlImage

    net_path = ensure_embedded(TINY_SDXL_CONTROLNET, cache_dir)
    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu",
                        controlnets={"canny": (net_path, None)})
    control = np.zeros((64, 64, 3), np.uint8)
    control[8:30, 8:40] = 255
    request = replace(REQUEST, controls=(ControlImage("canny", control.tobytes(), 0.8),))
    (ours,), = engine.generate([request])
    net = ControlNetModel.from_pretrained(net_path)
    first = StableDiffusionXLControlNetPipeline.from_pipe(engine.pipe, controlnet=net)
    second = StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(engine.pipe, controlnet=net)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    control_rows = torch.from_numpy(control).permute(2, 0, 1)[None].float() / 255
    args = {"prompt": REQUEST.prompt, "guidance_scale": 6.0,
            "generator": [torch.Generator().manual_seed(8)],
            "controlnet_conditioning_scale": 0.8}
    drawn = first(image=control_rows, width=64, height=64, num_inference_steps=4,
                  output_type="pt", **args).images
    upscaled = torch.nn.functional.interpolate(drawn, size=(96, 96), mode="bicubic")
    (theirs,) = second(image=upscaled.clamp(0, 1), strength=0.6, num_inference_steps=5,
                       control_image=torch.nn.functional.interpolate(
                           control_rows, size=(96, 96), mode="bilinear"), **args).images
    assert ours.size == (96, 96)
    assert_same_pixels(ours, theirs)
    unsteered = engine.generate([replace(request, controls=())])[0][0]
    assert np.abs(_px(ours) - _px(unsteered)).mean() > 1
