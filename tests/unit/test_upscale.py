"""Enlarging the finished images (`upscale`, `upscaler`), on the tiny SDXL and FLUX (CPU):
the images a request draws without it, through the upscaler's network or bicubically to
the larger size, not redrawn; an input at strength 0 enlarged itself; the sizes, and the
requests refused."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from deployments.engines.base import to_uint8
from deployments.engines.upscalers import UpscalerFile, load_upscaler, upscaled
from serve.config import ModelConfig
from serve.errors import InvalidField
from serve.inpaint_area import Overlay
from serve.types import GenerationRequest, SourceImage
from tests.unit.test_engine import _px, assert_each_as_alone, assert_same_pixels

REQUEST = GenerationRequest(model="a/b", prompt="a castle on a hill", width=64, height=48,
                            num_inference_steps=3, guidance_scale=6.0, seed=8,
                            scheduler="K_EULER", upscale=2, upscaler="esrgan")


def _tensor(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(_px(im).astype(np.float32)).permute(2, 0, 1)
                        for im in images]) / 255


@pytest.fixture(scope="module")
def esrgan_file(cache_dir):
    from deployments.tiny import TINY_ESRGAN, TINY_ESRGAN_FILE, ensure_embedded

    return ensure_embedded(TINY_ESRGAN, cache_dir) / TINY_ESRGAN_FILE


@pytest.fixture(scope="module")
def engine(tiny_sdxl_path, esrgan_file):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float32", "cpu",
                      upscalers={"esrgan": UpscalerFile(esrgan_file, 32, 8)})


def test_the_drawn_images_go_through_the_upscaler_unredrawn(engine, esrgan_file):
    """Two images of 64x48 drawn as without `upscale`, then the network's x4 in tiles of
    32 (as the config sets) brought to 128x96 by area; bicubic at 1.5 likewise."""
    ours = engine.generate([replace(REQUEST, num_outputs=2)])[0]
    drawn = engine.generate([replace(REQUEST, num_outputs=2, upscale=1, upscaler="")])[0]
    net = load_upscaler(esrgan_file, "cpu", torch.float32)
    theirs = to_uint8(upscaled(net, _tensor(drawn), (96, 128), tile=32, pad=8))
    assert [im.size for im in ours] == [(128, 96)] * 2 and [im.size for im in drawn] == [
        (64, 48)] * 2
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(_px(a), b.permute(1, 2, 0).numpy())
    (bicubic,) = engine.generate([replace(REQUEST, upscale=1.5, upscaler="bicubic")])[0]
    grown = F.interpolate(_tensor(drawn[:1]), size=(72, 96), mode="bicubic").clamp(0, 1)
    assert bicubic.size == (96, 72)
    assert_same_pixels(bicubic, to_uint8(grown)[0].permute(1, 2, 0).numpy())


def test_only_a_calls_real_images_are_enlarged(engine):
    """A call padded to a batch bucket of 3 with 2 filler images enlarges one image: its
    2 x 2 tiles."""
    calls = []
    hook = engine.upscalers.nets["esrgan"].register_forward_hook(lambda *_: calls.append(1))
    engine.buckets = (3,)
    try:
        out = engine.generate([REQUEST])
    finally:
        engine.buckets = ()
        hook.remove()
    assert len(out) == 1 and [im.size for im in out[0]] == [(128, 96)]
    assert len(calls) == 4


def test_requests_of_other_enlargements_share_a_call_each_enlarged_by_its_own(engine):
    """Upscaling follows the call: its requests share it whatever they enlarge by. Each
    gets its own request's images (the network's 2 x 2 tiles run for each of the three
    images it enlarges), and a withdrawn one's are none (not enlarged)."""
    batch = [REQUEST, replace(REQUEST, seed=9), replace(REQUEST, upscale=1.5,
                                                         upscaler="bicubic", seed=10),
             replace(REQUEST, upscale=1, upscaler="", num_outputs=2, seed=11),
             replace(REQUEST, seed=12)]
    assert len({engine.batch_key(r) for r in batch}) == 1
    alone = [engine.generate([request])[0] for request in batch]
    calls = []
    hook = engine.upscalers.nets["esrgan"].register_forward_hook(lambda *_: calls.append(1))
    try:
        together = engine.generate(batch)
        assert len(calls) == 12
        calls.clear()
        gone = engine.generate(batch, withdrawn=lambda: {1})
        assert len(calls) == 8  # the first and the last request's
    finally:
        hook.remove()
    sizes = [[(128, 96)], [(128, 96)], [(96, 72)], [(64, 48)] * 2, [(128, 96)]]
    assert [[im.size for im in images] for images in together] == sizes
    assert [[im.size for im in images] for images in gone] == sizes[:1] + [[]] + sizes[2:]
    for i, own in enumerate(alone):
        for a, b in zip(together[i], own, strict=True):
            assert_same_pixels(a, b)
        if i != 1:  # the withdrawn request's are none (above)
            for a, b in zip(gone[i], own, strict=True):
                assert_same_pixels(a, b)


def test_an_input_at_strength_0_is_enlarged_itself(engine):
    """No step runs: the answer is the input, enlarged (here bicubically, to compare)."""
    picture = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    source = SourceImage(picture.tobytes(), 0.0)
    (image,) = engine.generate([replace(REQUEST, source=source, upscaler="bicubic")])[0]
    grown = F.interpolate(torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255,
                          size=(96, 128), mode="bicubic").clamp(0, 1)
    assert np.array_equal(_px(image), to_uint8(grown)[0].permute(1, 2, 0).numpy())
    (same,) = engine.generate([replace(REQUEST, source=source, upscale=1, upscaler="")])[0]
    assert np.array_equal(_px(same), picture)


@pytest.mark.parametrize(("scale", "size"), [(1.0, (48, 64)), (0.5, (24, 32))])
def test_through_the_upscaler_at_1_or_below_the_networks_output_is_shrunk(engine, esrgan_file,
                                                                          scale, size):
    """real-esrgan's `scale` 1 or 0.5 (`through_upscaler`): the input image through the
    network (x4, tiles of 32), brought down to its own size or half by area."""
    model = ModelConfig(id="a/b", embedded="tiny-sdxl",
                        upscalers={"esrgan": {"embedded": "tiny-esrgan"}},
                        limits={"min_size": 8})
    picture = np.random.default_rng(7).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    request = GenerationRequest.for_model(
        model, "", width=64, height=48, source=SourceImage(picture.tobytes(), 0.0),
        upscale=scale, through_upscaler=True)
    assert request.upscaler == "esrgan" and request.delivered_size == size[::-1]
    (image,) = engine.generate([request])[0]
    net = load_upscaler(esrgan_file, "cpu", torch.float32)
    theirs = to_uint8(upscaled(net, _tensor([picture]), size, tile=32, pad=8))[0]
    assert np.array_equal(_px(image), theirs.permute(1, 2, 0).numpy())
    assert np.abs(_px(image).astype(int) - (picture if scale == 1 else 0)).mean() > 1
    with pytest.raises(InvalidField, match="0x0") as refused:
        replace(request, upscale=0.001).check_limits(model.limits)
    assert refused.value.field == "upscale"


def test_flux_enlarges_its_images_too(flux):
    request = GenerationRequest(model="a/f", prompt="a castle", width=64, height=48,
                                num_inference_steps=3, guidance_scale=3.5, seed=2,
                                scheduler="FlowMatchEuler")
    (drawn,) = flux.generate([request])[0]
    (ours,) = flux.generate([replace(request, upscale=1.5, upscaler="bicubic")])[0]
    grown = F.interpolate(_tensor([drawn]), size=(72, 96), mode="bicubic").clamp(0, 1)
    assert np.array_equal(_px(ours), to_uint8(grown)[0].permute(1, 2, 0).numpy())
    # In one call with a request enlarging nothing, each keeps its own size and pixels.
    batch = [replace(request, upscale=2, upscaler="bicubic"), replace(request, seed=3)]
    assert flux.batch_key(batch[0]) == flux.batch_key(batch[1])
    together = flux.generate(batch)
    assert [[im.size for im in images] for images in together] == [[(128, 96)], [(64, 48)]]
    assert_each_as_alone(flux, batch, together)


MODEL = ModelConfig(id="a/b", embedded="tiny-sdxl",
                    upscalers={"esrgan": {"embedded": "tiny-esrgan"}},
                    limits={"min_size": 8, "max_image_pixels": 512 * 512})


def test_the_answers_size_is_the_drawn_one_enlarged():
    request = GenerationRequest.for_model(MODEL, "x", width=64, height=48, upscale=2.5)
    assert request.upscaler == "esrgan" and request.delivered_size == (160, 120)
    hires = GenerationRequest.for_model(MODEL, "x", width=64, height=48, hires_scale=1.5,
                                        upscale=2)
    assert hires.output_size == (96, 72) and hires.delivered_size == (192, 144)
    plain = GenerationRequest.for_model(MODEL, "x", width=64, height=48, upscaler="esrgan")
    assert plain.upscaler == "" and plain.delivered_size == (64, 48)
    assert request.batch_key == replace(request, upscaler="bicubic", upscale=1).batch_key


@pytest.mark.parametrize(("model", "args", "field", "reason"), [
    (MODEL, {"upscale": 4, "width": 256, "height": 256}, "upscale", "1024x1024, over"),
    (MODEL, {"upscale": 2, "upscaler": "lanczos"}, "upscaler", "one of bicubic, esrgan"),
    (MODEL, {"upscale": 2, "source": SourceImage(
        bytes(64 * 64 * 3), 0.5, overlay=Overlay(b"", b"", 640, 480, (0, 0, 64, 64)))},
     "upscale", "padding_mask_crop"),
    (ModelConfig(id="a/k", family="flux", embedded="tiny-flux-kontext", kontext=True),
     {"upscale": 2}, "upscale", "enlarges no images"),
])
def test_requests_that_cannot_be_enlarged_are_refused_naming_the_field(model, args, field,
                                                                         reason):
    with pytest.raises(InvalidField, match=reason) as refused:
        GenerationRequest.for_model(model, "x", **{"width": 64, "height": 64} | args)
    assert refused.value.field == field


def test_an_inpainting_checkpoint_enlarges_its_images_with_its_upscalers():
    """It runs no hires pass (no text-to-image), yet its upscalers enlarge its images."""
    model = ModelConfig(id="a/i", embedded="tiny-sdxl-inpainting", inpainting=True,
                        upscalers={"esrgan": {"embedded": "tiny-esrgan"}})
    assert model.options()["upscale"] and not model.options()["hires"]
    request = GenerationRequest.for_model(model, "x", width=64, height=64, upscale=2)
    assert (request.upscaler, request.delivered_size) == ("esrgan", (128, 128))


def test_an_input_at_strength_0_keeps_its_own_size_within_the_images_a_model_reads(engine):
    """67 x 45 pixels (no multiple of 8) over the model's 64 x 64 drawing limit is
    answered at its size and enlarged; past max_image_pixels it is refused on `image`."""
    import io

    from PIL import Image

    from serve.source_images import source_image

    model = ModelConfig(id="a/b", embedded="tiny-sdxl",
                        upscalers={"esrgan": {"embedded": "tiny-esrgan"}},
                        limits={"max_size": 64, "max_pixels": 64 * 64,
                                "max_image_pixels": 100 * 100},
                        defaults={"width": 64, "height": 64})
    picture = np.random.default_rng(6).integers(0, 256, (45, 67, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(picture).save(data, "PNG")
    source, width, height = source_image(data.getvalue(), None, 0.0, None, None, model)
    assert (width, height) == (67, 45)
    request = GenerationRequest.for_model(model, "", width=width, height=height,
                                          source=source, upscale=1.5, upscaler="bicubic")
    assert request.runs_no_step and request.delivered_size == (100, 68)
    (image,) = engine.generate([request])[0]
    assert image.size == (100, 68)
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(model, "", width=101, height=100,
                                    source=SourceImage(bytes(101 * 100 * 3), 0.0))
    assert refused.value.field == "image"
    with pytest.raises(InvalidField) as refused:  # a drawn request keeps the limits
        GenerationRequest.for_model(model, "", width=72, height=48,
                                    source=SourceImage(bytes(72 * 48 * 3), 0.5))
    assert refused.value.field == "width"


@pytest.mark.parametrize("strength", [None, 0.0])
def test_an_upscaler_out_of_memory_is_the_calls_out_of_memory_error(engine, strength):
    """As a pipeline call's: the replica answers it (and retries smaller batches), never
    as an internal error; drawn or passed through."""
    from serve.errors import OutOfMemory

    request = REQUEST if strength is None else replace(
        REQUEST, source=SourceImage(bytes(64 * 48 * 3), strength))
    net = engine.upscalers.nets["esrgan"]

    def full(*_):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = net.register_forward_pre_hook(full)
    try:
        with pytest.raises(OutOfMemory):
            engine.generate([request])
    finally:
        hook.remove()
    assert engine.generate([request])[0][0].size == (128, 96)
