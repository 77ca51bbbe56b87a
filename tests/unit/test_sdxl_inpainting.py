"""SDXL inpainting checkpoints (a UNet of 9 input channels: noise, mask, masked image), on
the embedded tiny one (CPU): every request becomes an inpainting call, which gives the
pixels of diffusers' own inpainting pipeline with the kept part put back; text-to-image
and img2img repaint the whole image; and the config's checks of the UNet's kind."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from serve.config import ConfigError, ModelConfig, parse_config
from serve.types import GenerationRequest, SourceImage
from tests.unit.test_engine import _px, assert_same_pixels

RNG = np.random.default_rng(3)
PICTURE = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
MASK = np.zeros((64, 64), np.uint8)
MASK[8:40, 16:56] = 255
MODEL = ModelConfig(id="a/inpaint", embedded="tiny-sdxl-inpainting", inpainting=True,
                    defaults={"width": 64, "height": 64, "num_inference_steps": 4})


@pytest.fixture(scope="module")
def inpainting_path(cache_dir):
    from deployments.tiny import TINY_SDXL_INPAINTING, ensure_embedded

    return ensure_embedded(TINY_SDXL_INPAINTING, cache_dir)


@pytest.fixture(scope="module")
def inpainter(inpainting_path):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(inpainting_path, "float32", "cpu")


def _source(mask: np.ndarray | None, strength: float) -> SourceImage:
    return SourceImage(PICTURE.tobytes(), strength, None if mask is None else mask.tobytes())


def _diffusers(path, request: GenerationRequest, image: np.ndarray, mask: np.ndarray):
    """diffusers' SDXL inpainting pipeline on the same folder, inputs and seeds. The image
    goes in as a tensor in [0, 1] (as the engine passes it): from PIL, diffusers' processor
    makes it channels-last, and the VAE encoder's convolutions then sum in another order
    (up to 3 levels apart on the tiny model when the whole image is masked)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous().float() / 255
    return pipe(prompt=request.prompt, image=pixels,
                mask_image=Image.fromarray(mask), strength=request.source.strength,
                width=request.width, height=request.height,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale, num_images_per_prompt=request.num_outputs,
                generator=[torch.Generator().manual_seed(s) for s in request.seeds]).images


def test_an_inpainting_call_is_diffusers_own_with_the_kept_pixels_put_back(inpainter,
                                                                           inpainting_path):
    request = GenerationRequest.for_model(MODEL, "a red cube", seed=5, num_outputs=2,
                                          source=_source(MASK, 1.0))
    ours = inpainter.generate([request])[0]
    # One call per seed: diffusers encodes an image given once with the first generator
    # alone, where each of our rows draws from its own image's.
    theirs = [_diffusers(inpainting_path, replace(request, seed=seed, num_outputs=1),
                         PICTURE, MASK)[0] for seed in request.seeds]
    keep = MASK == 0
    for a, b in zip(ours, theirs, strict=True):
        assert (_px(a)[keep] == PICTURE[keep]).all()
        expected = np.where(keep[..., None], PICTURE, np.asarray(b))
        assert_same_pixels(a, expected)
    assert inpainter.describe()["inpainting_unet"] is True


def test_text_to_image_repaints_a_blank_image_whole(inpainter, inpainting_path):
    request = GenerationRequest.for_model(MODEL, "a lighthouse", seed=8)
    source = request.source
    assert (request.mode, source.strength) == ("inpaint", 1.0)
    assert source.mask == b"\xff" * 64 * 64 and source.rgb == bytes(64 * 64 * 3)
    ours = inpainter.generate([request])[0][0]
    black, white = np.zeros_like(PICTURE), np.full((64, 64), 255, np.uint8)
    assert_same_pixels(ours, _diffusers(inpainting_path, request, black, white)[0])
    other = inpainter.generate([replace(request, seed=9)])[0][0]
    assert np.abs(_px(ours) - _px(other)).mean() > 5


def test_img2img_repaints_the_whole_image_at_its_strength(inpainter):
    requests = [GenerationRequest.for_model(MODEL, "a red cube", seed=5,
                                            source=_source(None, strength))
                for strength in (0.0, 0.5)]
    assert [r.source.mask for r in requests] == [b"\xff" * 64 * 64] * 2
    assert requests[1].source.strength == 0.5 and requests[1].mode == "inpaint"
    untouched, repainted = (inpainter.generate([r])[0][0] for r in requests)
    assert (_px(untouched) == PICTURE).all()  # strength 0: the input is the answer
    assert np.abs(_px(repainted) - PICTURE).mean() > 5


def test_requests_of_one_strength_share_a_call_whatever_their_api_mode(inpainter):
    text = GenerationRequest.for_model(MODEL, "a", seed=1)
    masked = GenerationRequest.for_model(MODEL, "b", seed=2, source=_source(MASK, 1.0))
    assert text.batch_key == masked.batch_key
    together = inpainter.generate([text, masked])
    for request, images in zip((text, masked), together, strict=True):
        assert_same_pixels(images[0], inpainter.generate([request])[0][0])


def test_the_engine_refuses_a_call_that_is_not_inpainting(inpainter):
    plain = GenerationRequest(model="a/inpaint", prompt="x", width=64, height=64,
                              num_inference_steps=2, guidance_scale=5, seed=1,
                              scheduler="K_EULER")
    with pytest.raises(ValueError, match="inpainting calls only"):
        inpainter.generate([plain])


def _folder_with_unet_channels(tmp_path, source, channels: int):
    folder = tmp_path / f"sdxl-{channels}"
    shutil.copytree(source, folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"in_channels": channels}))
    return folder


@pytest.mark.parametrize(("channels", "inpainting", "message"), [
    (4, True, r"models\.0\.inpainting: .* takes 4 input channels, not an inpainting UNet's 9"),
    (9, False, r"models\.0\.inpainting: .* is an inpainting UNet .*set inpainting: true"),
])
def test_the_config_checks_the_unets_kind(tmp_path, tiny_sdxl_path, channels, inpainting,
                                          message):
    folder = _folder_with_unet_channels(tmp_path, tiny_sdxl_path, channels)
    def config(inpainting: bool):
        return parse_config({"models": [{"id": "a/b", "path": str(folder),
                                         "inpainting": inpainting}]})

    with pytest.raises(ConfigError, match=message):
        config(inpainting).check_paths()
    config(not inpainting).check_paths()


@pytest.mark.parametrize(("model", "message"), [
    ({"family": "flux", "embedded": "tiny-flux", "inpainting": True},
     r"inpainting: only sdxl models"),
    ({"embedded": "tiny-sdxl-inpainting"},
     r"embedded 'tiny-sdxl-inpainting' is not a sdxl model; set inpainting: true"),
    ({"embedded": "tiny-sdxl", "inpainting": True},
     r"embedded 'tiny-sdxl' is not a sdxl inpainting model"),
])
def test_config_errors_name_the_setting(model, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": [{"id": "a/b", **model}]})


def test_a_single_file_inpainting_checkpoint_draws_the_pixels_of_its_folder(tmp_path):
    """An inpainting fine-tune shared as one file (original layout), read with the configs
    of an SDXL inpainting folder: converted with its 9-channel UNet, as its folder draws."""
    from diffusers import StableDiffusionXLInpaintPipeline

    from deployments.engines import create_engine
    from deployments.tiny import TINY_SDXL_CONFIGS, build_random_sdxl
    from tests.single_file import save_single_file
    from tests.unit.test_single_file import _WIDER

    unet = {**TINY_SDXL_CONFIGS["unet"], "in_channels": 9, "cross_attention_dim": 32 + 48,
            "projection_class_embeddings_input_dim": 6 * 8 + 48}
    build_random_sdxl(tmp_path / "folder", {**TINY_SDXL_CONFIGS, "unet": unet,
                                            "text_encoder_2": _WIDER}, inpainting=True)
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tmp_path / "folder",
                                                            local_files_only=True)
    save_single_file(pipe, tmp_path / "inpainting.safetensors")
    shutil.copytree(tmp_path / "folder", tmp_path / "configs",
                    ignore=shutil.ignore_patterns("*.safetensors"))
    config = parse_config({"models": [
        {"id": "acme/file", "path": str(tmp_path / "inpainting.safetensors"),
         "configs_from": str(tmp_path / "configs"), "inpainting": True},
        {"id": "acme/folder", "path": str(tmp_path / "folder"), "inpainting": True}]})
    config.check_paths()
    from_file, from_folder = (create_engine(m, tmp_path / "cache", None)
                              for m in config.models)
    assert from_file.pipe.unet.config.in_channels == 9
    request = GenerationRequest.for_model(config.models[0], "a red cube", seed=5, width=64,
                                          height=64, num_inference_steps=3,
                                          source=_source(MASK, 1.0))
    (a,), (b,) = from_file.generate([request])[0], from_folder.generate([request])[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_controlnets_an_image_prompt_and_the_refiner_steer_an_inpainting_unet(cache_dir):
    """Each runs (the warm-up calls each once) and changes the repainted part."""
    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import (
        TINY_SDXL_CONTROLNET,
        TINY_SDXL_INPAINTING,
        TINY_SDXL_IP_ADAPTER,
        TINY_SDXL_REFINER,
        ensure_embedded,
    )
    from serve.types import ControlImage, ImagePrompt
    from tests.unit.test_image_prompts import FILES

    engine = SDXLEngine(
        ensure_embedded(TINY_SDXL_INPAINTING, cache_dir), "float32", "cpu",
        controlnets={"canny": (ensure_embedded(TINY_SDXL_CONTROLNET, cache_dir), None)},
        ip_adapter=(ensure_embedded(TINY_SDXL_IP_ADAPTER, cache_dir), *FILES),
        refiner=ensure_embedded(TINY_SDXL_REFINER, cache_dir))
    plain = GenerationRequest.for_model(MODEL, "a red cube", seed=5,
                                        source=_source(MASK, 1.0))
    engine.warm_up(plain)
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::8] = 255
    steered = [
        replace(plain, controls=(ControlImage("canny", stripes.tobytes()),)),
        replace(plain, image_prompt=ImagePrompt(stripes.tobytes(), 64, 64, 1.0)),
        replace(plain, refine="expert_ensemble_refiner", high_noise_frac=0.5)]
    base = _px(engine.generate([plain])[0][0])
    for request in steered:
        image = _px(engine.generate([request])[0][0])
        assert (image[MASK == 0] == PICTURE[MASK == 0]).all()
        assert np.abs(image - base)[MASK == 255].mean() > 1, request
