"""FLUX.1 Kontext on the embedded tiny Kontext (CPU): built from the tiny FLUX's configs
with random weights, saved as a FluxKontextPipeline folder and loaded as one. An edit's
pixels are diffusers' own FluxKontextPipeline's for the same reference, prompt and seeds,
alone or batched; its text-to-image is the Kontext pipeline's own without an image."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from serve.config import ConfigError, ModelConfig, parse_config
from serve.source_images import source_image
from serve.types import GenerationRequest, SourceImage
from tests.pictures import png_bytes
from tests.unit.test_engine import assert_same_pixels, withdrawing

MODEL = ModelConfig(id="a/kontext", family="flux", embedded="tiny-flux-kontext", kontext=True,
                    dtype="float32", defaults={"width": 96, "height": 96,
                                               "num_inference_steps": 4, "guidance_scale": 2.5})
RNG = np.random.default_rng(4)
PHOTO = RNG.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 96 wide, 64 high
OTHER = 255 - PHOTO


@pytest.fixture(scope="module")
def kontext_path(cache_dir):
    from deployments.tiny import TINY_FLUX_KONTEXT, ensure_embedded

    return ensure_embedded(TINY_FLUX_KONTEXT, cache_dir)


@pytest.fixture(scope="module")
def engine(kontext_path, cache_dir):
    from deployments.engines import create_engine

    return create_engine(MODEL, cache_dir, None)


@pytest.fixture(scope="module")
def reference(kontext_path):
    """diffusers' own Kontext pipeline over the same files."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(kontext_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _edit(pixels, prompt="make the sky red", **overrides) -> GenerationRequest:
    source, width, height = source_image(png_bytes(pixels), None, 0.8, None, None, MODEL)
    return GenerationRequest.for_model(MODEL, prompt, width=width, height=height,
                                       source=source, **{"seed": 5, **overrides})


def _diffusers(reference, request, image=None, engine=None) -> list:
    return reference(
        prompt=request.prompt, image=image, width=request.width, height=request.height,
        max_area=request.width * request.height, _auto_resize=False,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale, num_images_per_prompt=request.num_outputs,
        generator=[torch.Generator().manual_seed(s) for s in request.seeds],
        max_sequence_length=engine.max_sequence_length).images


def _px(image):
    return np.asarray(image).astype(int)


def test_the_tiny_kontext_is_a_kontext_folder_of_its_own_weights(kontext_path, tiny_flux_path):
    index = json.loads((kontext_path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxKontextPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    ours = (kontext_path / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    flux = (tiny_flux_path / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert len(ours) == len(flux) and ours != flux


def test_an_edit_takes_the_reference_shape_at_the_model_area_and_runs_every_step():
    request = _edit(PHOTO)
    # 96x96 = 9216 pixels in 3:2: 117.6 x 78.4, each down to a multiple of 16.
    assert (request.width, request.height) == (112, 64)
    assert request.mode == "edit" and request.source.strength == 1.0
    assert request.source.rgb == ImageOps.fit(
        Image.fromarray(PHOTO), (112, 64), Image.Resampling.LANCZOS).tobytes()
    # Another shape crops the reference and its mask (their middle two thirds here),
    # rather than stretching them.
    # At 1024², an 8:1 panorama would be 2896 wide: it keeps its shape within the model's
    # longest side (2048): 2048 x 256.
    big = MODEL.model_copy(update={"defaults": MODEL.defaults.model_copy(
        update={"width": 1024, "height": 1024})})
    panorama = np.zeros((500, 4000, 3), np.uint8)
    assert source_image(png_bytes(panorama), None, 0.8, None, None, big)[1:] == (2048, 256)
    mask = np.zeros((64, 96), np.uint8)
    mask[:, 40:] = 255
    given = source_image(png_bytes(PHOTO), png_bytes(mask), 0.3, 64, 64, MODEL)
    assert given[1:] == (64, 64) and given[0].strength == 1.0 and given[0].edit
    assert given[0].rgb == Image.fromarray(PHOTO[:, 16:80]).tobytes()
    assert given[0].mask == Image.fromarray(mask[:, 16:80]).tobytes()  # cropped alike


def test_batched_edits_give_diffusers_kontext_pixels_per_reference_and_seed(engine, reference):
    a, b = _edit(PHOTO), _edit(OTHER, "add a hat", seed=9, num_outputs=2)
    out = engine.generate([a, b])
    assert [len(images) for images in out] == [1, 2]
    for request, images in zip((a, b), out, strict=True):
        picture = Image.frombytes("RGB", (request.width, request.height), request.source.rgb)
        for ours, theirs in zip(images, _diffusers(reference, request, picture, engine),
                                strict=True):
            assert_same_pixels(ours, theirs)
    (alone,), = engine.generate([a])
    assert_same_pixels(alone, out[0][0])
    # Each step sees the reference's tokens beside the image's (7x4 of each at 112x64),
    # and another reference, same prompt and seed, gives another image.
    out, tokens = withdrawing(engine, [replace(a, source=b.source)], None,
                              engine.pipe.transformer,
                              lambda args, kwargs: kwargs["hidden_states"].shape[1])
    assert tokens == [2 * 7 * 4] * a.num_inference_steps
    assert (_px(out[0][0]) != _px(alone)).any()


def test_edits_of_different_guidance_scales_share_a_call_each_diffusers_own(engine, reference):
    a, b = _edit(PHOTO), _edit(OTHER, "add a hat", seed=9, guidance_scale=5.0)
    assert engine.batch_key(a) == engine.batch_key(b)
    out = engine.generate([a, b])
    for request, (ours,) in zip((a, b), out, strict=True):
        picture = Image.frombytes("RGB", (request.width, request.height), request.source.rgb)
        (theirs,) = _diffusers(reference, request, picture, engine)
        assert_same_pixels(ours, theirs)


def test_text_to_image_is_the_kontext_pipeline_without_an_image(engine, reference):
    request = GenerationRequest.for_model(MODEL, "a lamp", seed=3, width=64, height=80)
    assert request.mode == "txt2img"
    (ours,), = engine.generate([request])
    (theirs,) = _diffusers(reference, request, engine=engine)
    assert_same_pixels(ours, theirs)


def test_edits_and_text_to_image_never_share_a_call(engine):
    edit = _edit(PHOTO)
    plain = GenerationRequest.for_model(MODEL, edit.prompt, seed=5, width=edit.width,
                                        height=edit.height)
    assert engine.batch_key(edit) != engine.batch_key(plain)
    with pytest.raises(ValueError, match="equal batch keys"):
        engine.generate([edit, plain])


def test_a_withdrawn_edit_runs_on_beside_its_batchmate_and_a_call_left_empty_stops(engine):
    """The pipeline holds the references' latents out of the step callback's reach, so
    the rows stay to the end (as inpainting's); once every request has left, the call
    stops at the next step."""
    a, b = _edit(PHOTO), _edit(OTHER, seed=8)
    (alone,), = engine.generate([a])
    out, rows = withdrawing(engine, [a, b], 1, engine.pipe.transformer,
                            lambda args, kwargs: kwargs["hidden_states"].shape[0])
    assert rows == [2] * a.num_inference_steps
    assert_same_pixels(out[0][0], alone)
    steps = []
    out = engine.generate([a, b], withdrawn=lambda: {0, 1} if steps else set(),
                          on_step=lambda s, t: steps.append(s))
    assert steps == [1] and out == [[], []]


def test_warm_up_runs_edits_too(engine, monkeypatch):
    from deployments.engines.base import DiffusersEngine

    modes = []
    monkeypatch.setattr(engine, "generate", lambda requests, *a, **k: (
        modes.append((requests[0].mode, len(requests))),
        DiffusersEngine.generate(engine, requests, *a, **k))[1])
    engine.warm_up(GenerationRequest.for_model(MODEL, "warm-up", seed=1, width=64, height=64,
                                               num_inference_steps=1), max_images=2)
    assert modes == [("txt2img", 1), ("txt2img", 2), ("edit", 1), ("edit", 2)]


def test_a_masked_edit_is_diffusers_kontext_inpainting_with_the_unmasked_pixels_kept(
        engine, kontext_path):
    """With a mask, only its white part is repainted, the image being its own reference
    (diffusers' FluxKontextInpaintPipeline at strength 1); the black part is the input's
    own pixels, not the VAE's version of them."""
    from diffusers import FluxKontextInpaintPipeline

    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:72] = 255
    source, width, height = source_image(png_bytes(PHOTO), png_bytes(mask), 0.3, None, None, MODEL)
    request = GenerationRequest.for_model(MODEL, "make it gold", width=width, height=height,
                                          source=source, seed=6, num_outputs=2)
    assert request.mode == "inpaint" and source.strength == 1.0  # prompt_strength unused
    ours = [_px(image) for image in engine.generate([request])[0]]
    pipe = FluxKontextInpaintPipeline.from_pretrained(kontext_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    size = (request.width, request.height)
    picture = Image.frombytes("RGB", size, source.rgb)
    grey = Image.frombytes("L", size, source.mask)
    theirs = pipe(prompt=request.prompt, image=picture, mask_image=grey, strength=1.0,
                  width=size[0], height=size[1], max_area=size[0] * size[1],
                  _auto_resize=False, num_inference_steps=request.num_inference_steps,
                  guidance_scale=request.guidance_scale, num_images_per_prompt=2,
                  generator=[torch.Generator().manual_seed(s) for s in request.seeds],
                  max_sequence_length=engine.max_sequence_length).images
    white = np.asarray(grey)[..., None] == 255
    for a, b in zip(ours, theirs, strict=True):
        diff = np.abs(a - _px(b))[np.broadcast_to(white, a.shape)]
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
        assert np.array_equal(a[~white[..., 0]], _px(picture)[~white[..., 0]])
        assert np.abs(a - _px(picture))[np.broadcast_to(white, a.shape)].mean() > 5


@pytest.mark.parametrize("changes, message", [
    ({"family": "sdxl", "embedded": "tiny-sdxl"}, "only flux models are Kontext models"),
    ({"embedded": "tiny-flux"}, "'tiny-flux' is not a flux Kontext model"),
    ({"kontext": False}, "'tiny-flux-kontext' is not a flux model; set kontext: true")])
def test_the_config_ties_kontext_to_its_weights(changes, message):
    data = {**MODEL.model_dump(exclude_defaults=True), **changes}
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": [data]})


def test_start_up_refuses_a_folder_of_the_other_kind(kontext_path, tiny_flux_path):
    def config(path, kontext):
        return parse_config({"models": [{"id": "a/k", "family": "flux", "path": str(path),
                                         "kontext": kontext}]})

    config(kontext_path, True).check_paths()
    config(tiny_flux_path, False).check_paths()
    with pytest.raises(ConfigError, match=r"models\.0\.kontext: .* holds a FluxPipeline"):
        config(tiny_flux_path, True).check_paths()
    with pytest.raises(ConfigError, match=r"models\.0\.kontext: .* set kontext: true"):
        config(kontext_path, False).check_paths()


def test_a_single_file_is_checked_against_its_configs_folder(kontext_path, tiny_flux_path,
                                                             tmp_path):
    single = tmp_path / "kontext-tune.safetensors"
    single.write_bytes(b"checked for its name only here")

    def config(configs_from):
        return parse_config({"models": [{"id": "a/k", "family": "flux", "path": str(single),
                                         "configs_from": str(configs_from), "kontext": True}]})

    config(kontext_path).check_paths()
    with pytest.raises(ConfigError, match=r"models\.0\.kontext: .* holds a FluxPipeline"):
        config(tiny_flux_path).check_paths()


def test_a_plain_flux_image_is_still_img2img():
    flux = ModelConfig(id="a/f", family="flux", embedded="tiny-flux")
    source, _, _ = source_image(png_bytes(PHOTO), None, 0.4, None, None, flux)
    assert source.mode == "img2img" and source.strength == 0.4
    assert SourceImage(b"", 1.0, b"", edit=True).mode == "inpaint"


def test_an_edit_takes_loras_partial_images_and_the_speed_settings(kontext_path, cache_dir,
                                                                  compile_cache):
    """A FLUX LoRA (merged into the weights, one set per call) changes an edit; compiled
    with fused projections the edit keeps eager's pixels (<= 2 levels), and its partial
    images are decoded at the output's size."""
    from deployments.engines.flux import FluxKontextEngine
    from deployments.tiny import TINY_FLUX_DEMO, ensure_demo_loras
    from serve.adapters import AdapterCatalog, AdapterSet
    from serve.config import SpeedConfig

    catalog = AdapterCatalog.scan([(ensure_demo_loras(TINY_FLUX_DEMO, cache_dir), "flux",
                                    1.0)]).entries
    engines = [FluxKontextEngine(kontext_path, "float32", "cpu", adapters=catalog,
                                 fuse_adapters=True, compile_cache=compile_cache,
                                 speed=SpeedConfig(fuse_qkv=fast, compile=fast))
               for fast in (False, True)]
    assert engines[1].describe()["speed"]["compiled_blocks"] > 0
    edit = _edit(PHOTO, partial_images=2)
    styled = replace(edit, adapters=AdapterSet.of([("neon", 1.0)]))
    previews = []
    eager, fast = ([_px(engine.generate([r], on_preview=lambda i, images: previews.append(
        images[0].size))[0][0]) for r in (edit, styled)] for engine in engines)
    for a, b in zip(eager, fast, strict=True):
        diff = np.abs(a - b)
        assert diff.max() <= 2 and (diff > 0).mean() < 0.02, (diff.max(), diff.mean())
    assert np.abs(eager[1] - eager[0]).mean() > 1
    assert previews == [(112, 64)] * 2 * 4  # two per edit
