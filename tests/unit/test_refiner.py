"""SDXL's refiner (Replicate's `refine` input) on the embedded tiny SDXL and its tiny
refiner, saved as stable-diffusion-xl-refiner-1.0 is. Diffusers' own two-pipeline recipe
(base to latents, refiner img2img on them, the base's text_encoder_2 and VAE shared) is the
reference for the pixels."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from serve.config import ModelConfig, RefinerConfig
from serve.errors import InvalidField
from serve.types import GenerationRequest

REQUEST = GenerationRequest(model="m", prompt="a red cube", width=64, height=64,
                            num_inference_steps=10, guidance_scale=5, seed=3,
                            scheduler="K_EULER")
ENSEMBLE = replace(REQUEST, refine="expert_ensemble_refiner", high_noise_frac=0.7)
BASE_IMAGE = replace(REQUEST, refine="base_image_refiner", refine_steps=20)


@pytest.fixture(scope="module")
def refiner_path(cache_dir):
    from deployments.tiny import TINY_SDXL_REFINER, ensure_embedded

    return ensure_embedded(TINY_SDXL_REFINER, cache_dir)


@pytest.fixture(scope="module")
def engine(tiny_sdxl_path, refiner_path):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float32", "cpu", refiner=refiner_path)


def _px(image):
    return np.asarray(image).astype(int)


def test_the_tiny_refiner_is_saved_in_the_refiners_layout(refiner_path):
    index = json.loads((refiner_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"]
    unet = json.loads((refiner_path / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == 32  # text_encoder_2's width alone
    assert unet["projection_class_embeddings_input_dim"] == 5 * 8 + 32  # 5 time ids


def _diffusers_refined(base_path, refiner_path, request):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(base_path, local_files_only=True)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        refiner_path, local_files_only=True, text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2, vae=base.vae)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    generator = [torch.Generator("cpu").manual_seed(request.seed)]
    common = {"prompt": [request.prompt], "guidance_scale": request.guidance_scale,
              "generator": generator, "num_inference_steps": request.num_inference_steps}
    ensemble = request.refine == "expert_ensemble_refiner"
    latents = base(**common, width=64, height=64, output_type="latent",
                   **({"denoising_end": request.high_noise_frac} if ensemble else {})).images
    if ensemble:
        common["denoising_start"] = request.high_noise_frac
    else:
        common["num_inference_steps"] = request.refine_steps
    return _px(refiner(**common, negative_prompt=[""], image=latents).images[0])


@pytest.mark.parametrize("request_", [ENSEMBLE, BASE_IMAGE], ids=["ensemble", "base-image"])
def test_refined_images_are_diffusers_two_pipeline_recipes_pixels(
        engine, tiny_sdxl_path, refiner_path, request_):
    ours = _px(engine.generate([request_])[0][0])
    assert np.abs(ours - _px(engine.generate([REQUEST])[0][0])).mean() > 0.1  # it refines
    diff = np.abs(ours - _diffusers_refined(tiny_sdxl_path, refiner_path, request_))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_a_refined_seed_gives_the_same_image_alone_or_batched(engine):
    alone = engine.generate([ENSEMBLE])[0][0]
    batched = engine.generate([replace(ENSEMBLE, seed=9, prompt="a blue cone", num_outputs=2),
                               ENSEMBLE])
    diff = np.abs(_px(batched[1][0]) - _px(alone))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.abs(_px(batched[0][0]) - _px(batched[0][1])).mean() > 1


@pytest.mark.parametrize("leave_after", [3, 9], ids=["in-the-base", "in-the-refiner"])
def test_a_request_withdrawn_in_either_stage_leaves_and_the_others_keep_their_pixels(
        engine, leave_after):
    batch = [ENSEMBLE, replace(ENSEMBLE, seed=4, prompt="a blue cone"),
             replace(ENSEMBLE, seed=5, prompt="a green ball")]
    untouched = engine.generate(batch)
    steps = []
    out = engine.generate(batch, withdrawn=lambda: {1} if len(steps) >= leave_after else set(),
                          on_step=lambda s, t: steps.append((s, t)))
    assert [len(images) for images in out] == [1, 0, 1]
    for kept in (0, 2):
        diff = np.abs(_px(out[kept][0]) - _px(untouched[kept][0]))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # 10 steps, the refiner taking over at 0.7: 7 base steps, then 3 of the refiner's.
    assert steps == [(s, 7) for s in range(1, 8)] + [(s, 3) for s in range(1, 4)]


def test_a_call_whose_requests_all_leave_in_the_base_stage_skips_the_refiner(engine):
    steps = []
    out = engine.generate([ENSEMBLE], withdrawn=lambda: {0} if steps else set(),
                          on_step=lambda s, t: steps.append(s))
    assert out == [[]] and steps == [1]


def test_refinement_needs_a_model_with_a_refiner_and_sane_values():
    plain = ModelConfig(id="acme/plain", embedded="tiny-sdxl")
    refined = ModelConfig(id="acme/refined", embedded="tiny-sdxl",
                          refiner=RefinerConfig(embedded="tiny-sdxl-refiner"))
    for refine in ("expert_ensemble_refiner", "base_image_refiner"):
        with pytest.raises(InvalidField, match="has no refiner") as err:  # before its values
            GenerationRequest.for_model(plain, "x", refine=refine, num_inference_steps=2)
        assert err.value.field == "refine"
    assert GenerationRequest.for_model(refined, "x", refine="base_image_refiner",
                                       refine_steps=5).refine_steps == 5
    for refine, field, value in (("expert_ensemble_refiner", "high_noise_frac", 1.0),
                                 ("expert_ensemble_refiner", "high_noise_frac", 0.0),
                                 ("base_image_refiner", "refine_steps", 10_000),
                                 ("base_image_refiner", "refine_steps", 3)):
        with pytest.raises(InvalidField) as err:
            GenerationRequest.for_model(refined, "x", refine=refine, **{field: value})
        assert err.value.field == "refine_steps" if refine == "base_image_refiner" else field
    # At strength 0.3 the refiner needs 4 steps; unset refine_steps means the request's.
    with pytest.raises(InvalidField, match="at least 4 steps") as err:
        GenerationRequest.for_model(refined, "x", refine="base_image_refiner",
                                    num_inference_steps=3)
    assert err.value.field == "refine_steps"
    assert GenerationRequest.for_model(refined, "x", refine="base_image_refiner",
                                       num_inference_steps=3, refine_steps=4)
    # Values for the other refine style (or none) do not matter.
    assert GenerationRequest.for_model(refined, "x", high_noise_frac=1.0, refine_steps=10_000)
    with pytest.raises(ValueError, match="only sdxl models take a refiner"):
        ModelConfig(id="acme/flux", family="flux", embedded="tiny-flux",
                    refiner=RefinerConfig(embedded="tiny-sdxl-refiner"))
