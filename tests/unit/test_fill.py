"""FLUX.1 Fill on the embedded tiny Fill (CPU): the tiny FLUX's configs with a transformer
that also takes the masked image and the mask (384 input channels, as FLUX.1-Fill-dev),
random weights, saved as a FluxFillPipeline folder and loaded as one. A fill's pixels are
diffusers' own FluxFillPipeline's in the mask's white part, alone or batched, and the
input's own pixels elsewhere."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from serve.config import ConfigError, ModelConfig, parse_config
from serve.errors import InvalidField
from serve.source_images import source_image
from serve.types import GenerationRequest
from tests.pictures import png_bytes
from tests.unit.test_engine import assert_same_pixels, withdrawing

MODEL = ModelConfig(id="a/fill", family="flux", embedded="tiny-flux-fill", fill=True,
                    dtype="float32", defaults={"width": 96, "height": 96,
                                               "num_inference_steps": 4, "guidance_scale": 30})
RNG = np.random.default_rng(6)
PHOTO = RNG.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 96 wide, 64 high
MASK = np.zeros((64, 96), np.uint8)
MASK[16:48, 24:72] = 255


@pytest.fixture(scope="module")
def fill_path(cache_dir):
    from deployments.tiny import TINY_FLUX_FILL, ensure_embedded

    return ensure_embedded(TINY_FLUX_FILL, cache_dir)


@pytest.fixture(scope="module")
def engine(fill_path, cache_dir):
    from deployments.engines import create_engine

    return create_engine(MODEL, cache_dir, None)


@pytest.fixture(scope="module")
def reference(fill_path):
    """diffusers' own Fill pipeline over the same files."""
    from diffusers import FluxFillPipeline

    pipe = FluxFillPipeline.from_pretrained(fill_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fill(pixels=PHOTO, mask=MASK, prompt="a red vase", **overrides) -> GenerationRequest:
    source, width, height = source_image(png_bytes(pixels), None if mask is None else png_bytes(mask),
                                         0.4, None, None, MODEL)
    return GenerationRequest.for_model(MODEL, prompt, width=width, height=height,
                                       source=source, **{"seed": 5, **overrides})


def _px(image):
    return np.asarray(image).astype(int)


def _diffusers(reference, request, engine) -> list:
    """The pipeline's images for the request, the image and mask given once per image (so
    that each image's VAE encoding draws from its own generator, as each of ours does)."""
    size, n = (request.width, request.height), request.num_outputs
    return reference(
        prompt=request.prompt, image=[Image.frombytes("RGB", size, request.source.rgb)] * n,
        mask_image=[Image.frombytes("L", size, request.source.mask)] * n, width=size[0],
        height=size[1], num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale, num_images_per_prompt=request.num_outputs,
        generator=[torch.Generator().manual_seed(s) for s in request.seeds],
        max_sequence_length=engine.max_sequence_length).images


def _assert_filled(ours, theirs, request):
    """The mask's white part is diffusers' (float32 on CPU, within a level), the rest the
    input's own pixels, and the white part is not the input's."""
    size = (request.height, request.width)
    white = np.frombuffer(request.source.mask, np.uint8).reshape(size) == 255
    source = np.frombuffer(request.source.rgb, np.uint8).reshape(*size, 3).astype(int)
    ours = _px(ours)
    diff = np.abs(ours - _px(theirs))[white]
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.array_equal(ours[~white], source[~white])
    assert np.abs(ours - source)[white].mean() > 5


def test_the_tiny_fill_is_a_fill_folder_whose_transformer_takes_image_and_mask(fill_path):
    index = json.loads((fill_path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxFillPipeline"
    config = json.loads((fill_path / "transformer" / "config.json").read_text())
    # 64 packed latent channels, 64 of the masked image, 256 of the mask (8x8 pixels per
    # latent pixel, 2x2 latent pixels per token): FLUX.1-Fill-dev's 384; out: the latents.
    assert (config["in_channels"], config["out_channels"]) == (384, 64)


def test_batched_fills_give_diffusers_fill_pixels_per_image_and_seed(engine, reference):
    other = np.zeros((64, 96), np.uint8)
    other[:, 48:] = 255
    a, b = _fill(), _fill(255 - PHOTO, other, "a window", seed=9, num_outputs=2)
    assert a.mode == "inpaint" and a.source.strength == 1.0  # prompt_strength is not used
    out = engine.generate([a, b])
    assert [len(images) for images in out] == [1, 2]
    for request, images in zip((a, b), out, strict=True):
        for ours, theirs in zip(images, _diffusers(reference, request, engine), strict=True):
            _assert_filled(ours, theirs, request)
    (alone,), = engine.generate([a])
    assert_same_pixels(alone, out[0][0])


def test_each_step_reads_the_masked_image_and_mask_beside_the_noise(engine):
    """384 channels per token on every step; the rows stay when a request leaves (the
    masked image's latents are out of the step callback's reach), and a call left with
    no request stops at the next step."""
    a, b = _fill(), _fill(seed=8)
    (alone,), = engine.generate([a])
    out, shapes = withdrawing(engine, [a, b], 1, engine.pipe.transformer,
                              lambda args, kwargs: tuple(kwargs["hidden_states"].shape))
    assert shapes == [(2, 6 * 4, 384)] * a.num_inference_steps  # 96x64: 6x4 tokens
    assert_same_pixels(out[0][0], alone)
    steps = []
    out = engine.generate([a, b], withdrawn=lambda: {0, 1} if steps else set(),
                          on_step=lambda s, t: steps.append(s))
    assert steps == [1] and out == [[], []]


def test_outpainting_fills_the_transparent_border_and_keeps_the_picture(engine, reference):
    """An image padded with a transparent border (as a client extends a picture) and no
    mask: the border is drawn, the picture kept exactly."""
    canvas = np.zeros((64, 96, 4), np.uint8)
    canvas[16:48, 24:72, :3] = PHOTO[16:48, 24:72]
    canvas[16:48, 24:72, 3] = 255
    request = _fill(canvas, None, "a wide landscape")
    border = np.frombuffer(request.source.mask, np.uint8).reshape(64, 96)
    assert (border == 255 - MASK).all()
    (ours,), = engine.generate([request])
    (theirs,) = _diffusers(reference, request, engine)
    _assert_filled(ours, theirs, request)
    assert np.array_equal(_px(ours)[16:48, 24:72], PHOTO[16:48, 24:72].astype(int))


def test_a_fill_needs_an_image_and_a_mask():
    with pytest.raises(InvalidField) as err:
        GenerationRequest.for_model(MODEL, "a vase", width=64, height=64)
    assert err.value.field == "image" and "send an image and a mask" in err.value.reason
    source, _, _ = source_image(png_bytes(PHOTO), None, 0.4, None, None, MODEL)
    assert source.mode == "img2img"  # an opaque image, no mask: nothing marked to fill
    with pytest.raises(InvalidField) as err:
        GenerationRequest.for_model(MODEL, "a vase", width=96, height=64, source=source)
    assert err.value.field == "mask" and "transparent part" in err.value.reason


def test_an_area_sizes_a_fill_at_the_input_shape():
    source, width, height = source_image(png_bytes(PHOTO), png_bytes(MASK), 0.4, None, None, MODEL,
                                         area=1024 * 1024)
    # 3:2 at one megapixel: 1254.1 x 836.1, each down to a multiple of 16.
    assert (width, height) == (1248, 832) and len(source.mask) == 1248 * 832
    assert source_image(png_bytes(PHOTO), png_bytes(MASK), 0.4, None, None, MODEL)[1:] == (96, 64)


def test_the_warm_up_request_of_a_fill_model_fills_a_blank_image():
    from deployments.model import ModelDeployment

    cls = ModelDeployment.func_or_class
    request = cls._warm_request(type("Replica", (), {"cfg": MODEL})(), 3)
    assert request.mode == "inpaint" and request.num_inference_steps == 3
    assert set(request.source.mask) == {255} and set(request.source.rgb) == {0}
    request.check_limits(MODEL.limits, MODEL.rules)
    flux = ModelConfig(id="a/f", family="flux", embedded="tiny-flux")
    assert cls._warm_request(type("Replica", (), {"cfg": flux})(), 3).source is None


@pytest.mark.parametrize("changes, message", [
    ({"family": "sdxl", "embedded": "tiny-sdxl"}, "only flux models are Fill models"),
    ({"kontext": True}, "a model is one FLUX.1 tool, not kontext and fill"),
    ({"embedded": "tiny-flux"}, "'tiny-flux' is not a flux Fill model"),
    ({"fill": False}, "'tiny-flux-fill' is not a flux model; set fill: true")])
def test_the_config_ties_fill_to_its_weights(changes, message):
    data = {**MODEL.model_dump(exclude_defaults=True), **changes}
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": [data]})


def test_start_up_refuses_a_folder_of_another_kind(fill_path, tiny_flux_path):
    def config(path, **kind):
        return parse_config({"models": [{"id": "a/f", "family": "flux", "path": str(path),
                                         **kind}]})

    config(fill_path, fill=True).check_paths()
    with pytest.raises(ConfigError, match=r"models\.0\.fill: .* holds a FluxPipeline"):
        config(tiny_flux_path, fill=True).check_paths()
    with pytest.raises(ConfigError, match=r"models\.0\.fill: .* set fill: true \(its "
                                          r"transformer takes an image and a mask"):
        config(fill_path).check_paths()
    with pytest.raises(ConfigError, match=r"models\.0\.kontext: .* holds a FluxFillPipeline"):
        config(fill_path, kontext=True).check_paths()


def test_replicate_megapixels_set_the_area_and_match_input_fits_the_limits():
    from serve.routes.replicate_flux import FILL_AREAS, FillInput
    from serve.source_images import INPUT_AREA

    assert FILL_AREAS == {"1": 1024 * 1024, "0.25": 512 * 512, "match_input": INPUT_AREA}
    inp = FillInput.model_validate({"prompt": "x", "image": "data:,", "go_fast": False})
    assert inp.source_area() == 1024 * 1024 and inp.request_args()["width"] is None
    # match_input keeps the input's size within the model's limits (96x64 here) ...
    assert source_image(png_bytes(PHOTO), png_bytes(MASK), 0.4, None, None, MODEL,
                        area=INPUT_AREA)[1:] == (96, 64)
    # ... and shrinks a larger one, keeping its shape: 3000x2000 is 6 MP, and this
    # model takes at most 1 MP: 1254.1 x 836.1, each down to a multiple of 16.
    big = np.zeros((2000, 3000, 3), np.uint8)
    source, width, height = source_image(png_bytes(big), png_bytes(np.zeros((2000, 3000), np.uint8)),
                                         0.4, None, None, MODEL, area=INPUT_AREA)
    assert (width, height) == (1248, 832) and width * height <= MODEL.limits.max_pixels
    assert len(source.mask) == 1248 * 832


def test_flux_loras_fill_in_slots_one_call_for_different_sets_and_previews(fill_path,
                                                                          cache_dir):
    """FLUX LoRAs (the demo PEFT and kohya ones) apply to a Fill's transformer, whose
    layers they target are FLUX's: fills with different adapter sets share one call in
    LoRA slots, each with its own pixels in the mask and the input's outside it; partial
    images come at the output's size."""
    from dataclasses import replace

    from deployments.engines.flux import FluxFillEngine
    from deployments.tiny import TINY_FLUX_DEMO, ensure_demo_loras
    from serve.adapters import AdapterCatalog, AdapterSet

    catalog = AdapterCatalog.scan([(ensure_demo_loras(TINY_FLUX_DEMO, cache_dir), "flux",
                                    1.0)]).entries
    engine = FluxFillEngine(fill_path, "float32", "cpu", adapters=catalog)
    plain = _fill(partial_images=1)
    neon = replace(plain, adapters=AdapterSet.of([("neon", 1.0)]))
    ink = replace(plain, adapters=AdapterSet.of([("ink", 0.8)]))
    assert engine.batch_key(plain) == engine.batch_key(neon) == engine.batch_key(ink)
    previews = []
    together = engine.generate([plain, neon, ink], on_preview=lambda i, images: previews.append(
        (i, images[0].size)))
    white = MASK == 255
    alone = [engine.generate([r])[0][0] for r in (plain, neon, ink)]
    for (ours,), solo in zip(together, alone, strict=True):
        assert_same_pixels(ours, solo)
        assert np.array_equal(_px(ours)[~white], PHOTO[~white].astype(int))
    assert np.abs(_px(alone[1]) - _px(alone[0]))[white].mean() > 1
    assert np.abs(_px(alone[2]) - _px(alone[0]))[white].mean() > 1
    assert sorted(previews) == [(0, (96, 64)), (1, (96, 64)), (2, (96, 64))]
