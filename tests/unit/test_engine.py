"""The SDXL engine on the tiny embedded model, without Ray."""

import io

import numpy as np
import pytest
from PIL import Image

from deployments.encoding import encode_image
from serve.types import SCHEDULERS, GenerationRequest
from tests.conftest import xmp_label


@pytest.fixture(scope="module")
def engine(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float16", "cpu")


def _req(seed, **overrides):
    base = {"model": "a/b", "prompt": "a red cube", "width": 64, "height": 64, "num_inference_steps": 3,
                "guidance_scale": 7.5, "seed": seed, "scheduler": "K_EULER"}
    return GenerationRequest(**{**base, **overrides})


def _px(image):
    return np.asarray(image).astype(int)


def assert_same_pixels(a, b):
    """Equal up to one 8-bit level on a few pixels.

    A batched matmul may sum in another order than a single one, so a float32 value that
    sits on a rounding boundary can land one level away after quantisation.
    """
    diff = np.abs(_px(a) - _px(b))
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() < 0.01


def assert_each_as_alone(engine, batch: list, together: list) -> list:
    """Each request's images of a shared call (`together`) are its own call's, up to
    `assert_same_pixels`; return its own call's."""
    alone = [engine.generate([request])[0] for request in batch]
    for shared, own in zip(together, alone, strict=True):
        assert len(shared) == len(own)
        for a, b in zip(shared, own, strict=True):
            assert_same_pixels(a, b)
    return alone


def withdrawing(engine, batch: list, after: int | None, module, rows_of):
    """Run `batch` on `engine`, request 1 withdrawn after step `after` (None: none is);
    return the images and `rows_of(args, kwargs)` of each forward of `module` (a part of
    the engine's pipeline) during the call."""
    steps, rows = [], []
    hook = module.register_forward_hook(
        lambda m, args, kwargs, out: rows.append(rows_of(args, kwargs)), with_kwargs=True)
    try:
        out = engine.generate(batch, withdrawn=lambda: {1} if after is not None
                              and len(steps) >= after else set(),
                              on_step=lambda s, t: steps.append(s))
    finally:
        hook.remove()
    return out, rows


def test_cpu_computes_in_float32_whatever_the_configured_dtype(engine):
    assert engine.describe()["dtype"] == "float32" and engine.describe()["device"] == "cpu"
    assert engine.describe()["weights"] == dict.fromkeys(
        ("unet", "vae", "text_encoder", "text_encoder_2"), "float32")


def test_the_img2img_and_inpainting_pipelines_share_the_modules_in_their_dtype(
        tiny_sdxl_path):
    """diffusers' from_pipe casts what it shares to float32 unless told otherwise: a
    bfloat16 model (as on a GPU) must stay bfloat16, and the warning diffusers gives at
    any cast, naming no module, is not logged."""
    import logging

    import torch
    from diffusers import (
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    from deployments.engines.loading import load_pipeline, share_modules

    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    diffusers_log.addHandler(handler)
    try:
        pipe = load_pipeline(StableDiffusionXLPipeline, tiny_sdxl_path, torch.bfloat16, None)
        shared = share_modules(pipe, {"img2img": StableDiffusionXLImg2ImgPipeline,
                                      "inpaint": StableDiffusionXLInpaintPipeline},
                               torch.bfloat16)
    finally:
        diffusers_log.removeHandler(handler)
    for other in shared.values():
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            assert getattr(other, part) is getattr(pipe, part)
            assert next(getattr(pipe, part).parameters()).dtype == torch.bfloat16, part
    assert [type(p).__name__ for p in shared.values()] == [
        "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"]
    assert not [w for w in warnings if "kept in float32" in w], warnings


@pytest.mark.parametrize("width, height", [(64, 64), (128, 64), (64, 192), (512, 64)])
def test_image_has_the_requested_size(engine, width, height):
    (images,) = engine.generate([_req(1, width=width, height=height, num_inference_steps=1)])
    assert [im.size for im in images] == [(width, height)]


def test_the_pipeline_puts_no_watermark_of_its_own_on_its_images(engine):
    """diffusers' SDXL pipelines mark their images themselves where the invisible-watermark
    library is installed, as it is here: the engine's images are the pipeline's unmarked
    (deployments.outputs marks them where the request asks). The decoder reads about half
    of SDXL's 48 bits wrong from an unmarked image, none from a marked one."""
    from deployments.watermark import SDXL_MESSAGE, message_bits, watermarked
    from tests.conftest import read_watermark

    bits = message_bits(SDXL_MESSAGE)
    (images,) = engine.generate([_req(3, width=512, height=512, num_inference_steps=1)])
    assert (read_watermark(images[0], len(bits)) != bits).sum() >= 12
    assert (read_watermark(watermarked(images[0], bits), len(bits)) == bits).all()


def test_same_seed_same_pixels_and_other_seed_other_pixels(engine):
    a = engine.generate([_req(7)])[0][0]
    b = engine.generate([_req(7)])[0][0]
    c = engine.generate([_req(8)])[0][0]
    assert np.array_equal(_px(a), _px(b))
    assert np.abs(_px(a) - _px(c)).mean() > 10


def test_an_image_does_not_depend_on_its_batchmates(engine):
    alone = [engine.generate([r])[0][0] for r in
             (_req(7), _req(8, prompt="a blue ball", negative_prompt="blurry"))]
    batch = engine.generate([_req(7), _req(8, prompt="a blue ball", negative_prompt="blurry"),
                             _req(99, prompt="other", num_outputs=2)])
    assert [len(images) for images in batch] == [1, 1, 2]
    assert_same_pixels(alone[0], batch[0][0])
    assert_same_pixels(alone[1], batch[1][0])


def test_output_i_uses_seed_plus_i(engine):
    (images,) = engine.generate([_req(40, num_outputs=3)])
    second_alone = engine.generate([_req(41)])[0][0]
    assert_same_pixels(images[1], second_alone)
    assert np.abs(_px(images[0]) - _px(images[1])).mean() > 10


def test_mixed_batch_keys_are_refused(engine):
    with pytest.raises(ValueError, match="equal batch keys"):
        engine.generate([_req(1), _req(2, width=128)])


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_runs_and_is_deterministic(engine, scheduler, steps):
    a = engine.generate([_req(3, scheduler=scheduler, num_inference_steps=steps)])[0][0]
    b = engine.generate([_req(3, scheduler=scheduler, num_inference_steps=steps)])[0][0]
    assert a.size == (64, 64) and np.array_equal(_px(a), _px(b))


def test_schedulers_give_different_images(engine):
    euler = engine.generate([_req(3, scheduler="K_EULER")])[0][0]
    ddim = engine.generate([_req(3, scheduler="DDIM")])[0][0]
    assert np.abs(_px(euler) - _px(ddim)).mean() > 1


def test_engine_check_passes_on_a_loaded_pipeline(engine):
    engine.check()


def test_engine_check_fails_when_the_weights_go_bad(tiny_sdxl_path):
    import torch

    from deployments.engines.sdxl import SDXLEngine

    broken = SDXLEngine(tiny_sdxl_path, "float32", "cpu")
    with torch.no_grad():
        next(broken.pipe.unet.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="not usable"):
        broken.check()


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff"),
                                        ("webp", b"RIFF")])
def test_images_encode_in_the_requested_format(fmt, magic):
    image = Image.fromarray(np.full((16, 24, 3), 200, dtype=np.uint8))
    data = encode_image(image, fmt, 80)
    assert data.startswith(magic)
    assert Image.open(io.BytesIO(data)).size == (24, 16)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_a_labeled_image_says_a_model_made_it_with_the_same_pixels(fmt):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    plain, labeled = encode_image(image, fmt, 80), encode_image(image, fmt, 80, "acme/sdxl")
    assert xmp_label(plain) is None
    assert xmp_label(labeled) == (
        "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia",
        "Atelier (acme/sdxl)")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(plain))),
                          np.asarray(Image.open(io.BytesIO(labeled))))


def test_jpeg_quality_changes_the_size():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert len(encode_image(image, "jpeg", 20)) < len(encode_image(image, "jpeg", 95))


def test_each_denoising_step_is_reported(engine):
    steps = []
    engine.generate([_req(1, num_inference_steps=3)], on_step=lambda s, t: steps.append((s, t)))
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_a_call_whose_requests_are_all_withdrawn_stops_after_the_current_step(engine):
    steps = []
    (images,) = engine.generate([_req(1, num_inference_steps=5)],
                                withdrawn=lambda: {0} if len(steps) >= 2 else set(),
                                on_step=lambda s, t: steps.append(s))
    assert steps == [1, 2] and images == []


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_withdrawn_request_leaves_the_running_batch_and_the_others_keep_their_pixels(
        engine, scheduler):
    batch = [_req(1, scheduler=scheduler, num_inference_steps=5),
             _req(2, scheduler=scheduler, num_inference_steps=5, num_outputs=2,
                  prompt="a blue cone"),
             _req(3, scheduler=scheduler, num_inference_steps=5, prompt="a green ball")]
    untouched = engine.generate(batch)
    steps, unet_rows = [], []
    hook = engine.pipe.unet.register_forward_pre_hook(
        lambda module, args: unet_rows.append(args[0].shape[0]))
    try:
        out = engine.generate(batch, withdrawn=lambda: {1} if len(steps) >= 3 else set(),
                              on_step=lambda s, t: steps.append(s))
    finally:
        hook.remove()
    assert out[1] == [] and [len(images) for images in out] == [1, 0, 1]
    assert_same_pixels(out[0][0], untouched[0][0])
    assert_same_pixels(out[2][0], untouched[2][0])
    # Classifier-free guidance runs two UNet rows per image: 4 images, then 2.
    assert unet_rows[0] == 8 and unet_rows[-1] == 4 and len(steps) == len(unet_rows)

def test_running_out_of_memory_raises_a_clear_error_and_the_engine_keeps_serving(
        tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine
    from serve.errors import OutOfMemory

    drill = SDXLEngine(tiny_sdxl_path, "float32", "cpu", simulate_oom_above_images=2)
    with pytest.raises(OutOfMemory, match=r"3 image\(s\) of 64x64") as raised:
        drill.generate([_req(1, num_outputs=2), _req(2)])
    assert raised.value.status == 503 and raised.value.__context__ is None
    (images,) = drill.generate([_req(1, num_outputs=2)])
    reference = SDXLEngine(tiny_sdxl_path, "float32", "cpu").generate([_req(1, num_outputs=2)])
    assert [_px(im).tolist() for im in images] == [_px(im).tolist() for im in reference[0]]
    drill.check()
