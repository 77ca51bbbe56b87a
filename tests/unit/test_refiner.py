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


def test_each_image_keeps_its_guidance_scale_through_the_refiner(engine):
    other = replace(ENSEMBLE, guidance_scale=ENSEMBLE.guidance_scale + 4, seed=9)
    assert engine.batch_key(ENSEMBLE) == engine.batch_key(other)
    together = engine.generate([ENSEMBLE, other])
    for request, shared in zip((ENSEMBLE, other), together, strict=True):
        diff = np.abs(_px(shared[0]) - _px(engine.generate([request])[0][0]))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


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


@pytest.fixture(scope="module")
def refiner_file(refiner_path, tmp_path_factory):
    """(the tiny refiner as one original-layout file, as sd_xl_refiner_1.0.safetensors is,
    a copy of its folder without weights)."""
    import shutil

    from diffusers import StableDiffusionXLImg2ImgPipeline

    from tests.single_file import save_single_file

    root = tmp_path_factory.mktemp("single-file-refiner")
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_path, local_files_only=True)
    save_single_file(pipe, root / "refiner-tune.safetensors")
    shutil.copytree(refiner_path, root / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    return root / "refiner-tune.safetensors", root / "configs"


def _with_refiner(file, configs):
    from serve.config import parse_config

    config = parse_config({"models": [{"id": "acme/refined", "embedded": "tiny-sdxl",
                                       "refiner": {"path": str(file),
                                                   "configs_from": str(configs)}}]})
    config.check_paths()
    return config.models[0]


def test_a_single_file_refiner_is_converted_once_and_refines_as_its_folder_does(
        engine, refiner_path, refiner_file, cache_dir, tmp_path):
    from safetensors.torch import load_file

    from deployments.engines import create_engine
    from deployments.engines import refiner_path as converted_refiner

    model = _with_refiner(*refiner_file)
    converted = converted_refiner(model.refiner, tmp_path)
    assert converted.parent == tmp_path / "converted"
    (theirs,), (ours,) = ((p / "unet").glob("*.safetensors") for p in (refiner_path, converted))
    a, b = load_file(theirs), load_file(ours)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in converted.iterdir() if p.is_symlink()) == sorted(
        p.name for p in refiner_file[1].iterdir() if p.name != "unet")
    from_file = create_engine(model, cache_dir, None)
    for request in (ENSEMBLE, BASE_IMAGE):
        assert np.array_equal(_px(from_file.generate([request])[0][0]),
                              _px(engine.generate([request])[0][0]))


def test_a_scaled_fp8_refiner_file_is_converted_to_its_weights_times_their_scales(
        refiner_file, tmp_path):
    """As ComfyUI's "scaled" FP8 files hold it: the converted UNet is that of the file of
    the values the scaled one stands for."""
    from safetensors.torch import load_file, save_file

    from deployments.engines.loading import converted_checkpoint
    from tests.single_file import scaled_fp8

    file, configs = refiner_file
    state = load_file(file)
    dtype = state["model.diffusion_model.out.2.bias"].dtype  # the file's, kept
    stored, values = scaled_fp8(state, "weight_scale", True, dtype=dtype)
    save_file(stored, str(tmp_path / "scaled.safetensors"))
    save_file(values, str(tmp_path / "values.safetensors"))
    ours, expected = (converted_checkpoint(tmp_path / f"{name}.safetensors", configs,
                                           tmp_path, "sdxl-refiner")
                      for name in ("scaled", "values"))
    (a,), (b,) = ((p / "unet").glob("*.safetensors") for p in (ours, expected))
    a, b = load_file(a), load_file(b)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.dtype == torch.float8_e4m3fn for v in stored.values())


def test_a_single_file_refiners_version_follows_the_file_not_the_configs_weights(
        refiner_file, tmp_path):
    import shutil

    from serve.versions import version_id

    shutil.copytree(refiner_file[1], tmp_path / "configs")
    shutil.copy(refiner_file[0], tmp_path / "refiner.safetensors")
    model = _with_refiner(tmp_path / "refiner.safetensors", tmp_path / "configs")
    first = version_id(model, tmp_path)
    (tmp_path / "configs" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    assert version_id(model, tmp_path) == first  # weights the refiner does not read
    data = bytearray((tmp_path / "refiner.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "refiner.safetensors").write_bytes(bytes(data))
    assert version_id(model, tmp_path) != first


def test_a_refiner_file_needs_its_configs_and_configs_need_a_file(refiner_path, refiner_file):
    from serve.config import ConfigError, parse_config

    file, configs = refiner_file
    for refiner, error in (
            ({"path": str(file)}, (r"models\.0\.refiner\.path: .*refiner-tune\.safetensors "
                                   r"is a file: only a \.safetensors checkpoint with configs_from")),
            ({"path": str(refiner_path), "configs_from": str(configs)},
             r"models\.0\.refiner\.configs_from: goes only with a single-file path"),
            ({"path": str(file), "configs_from": str(file.parent)},
             r"models\.0\.refiner\.configs_from: .* is not a diffusers folder")):
        config = parse_config({"models": [{"id": "acme/refined", "embedded": "tiny-sdxl",
                                           "refiner": refiner}]})
        with pytest.raises(ConfigError, match=error):
            config.check_paths()
    with pytest.raises(ConfigError, match=r"refiner\.configs_from: goes with a single-file "
                       r"path alone"):
        parse_config({"models": [{"id": "acme/refined", "embedded": "tiny-sdxl", "refiner": {
            "embedded": "tiny-sdxl-refiner", "configs_from": str(configs)}}]})
