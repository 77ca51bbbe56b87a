"""Masked image prompts: an SDXL IP-Adapter's picture steering only the white part of a
mask (diffusers' `ip_adapter_masks`), on the tiny SDXL's engine with the embedded tiny
adapter (CPU): requests with different masks share a call, each with the pixels of
diffusers' pipeline given its mask; a black mask leaves the plain image, a white one the
unmasked prompt's; the hires pass masks its second size too; the routes read masks and
refuse them where they do not apply, naming the field."""

import asyncio
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from serve.errors import InvalidField
from serve.types import GenerationRequest, ImagePrompt, Picture
from tests.unit.test_engine import _px, assert_same_pixels
from tests.unit.test_image_prompts import (
    BASE,
    DOTS,
    STRIPES,
    _reference,
    _seeds,
    adapter_path,  # noqa: F401
    engine,  # noqa: F401
)
from tests.unit.test_mood_boards import ARGS, _text


def _mask(box: tuple[int, int, int, int] | None, size=(64, 64), fill: int = 255) -> Image.Image:
    """A black mask with `box` (left, top, right, bottom) white; None: all `fill`."""
    mask = Image.new("L", size, fill if box is None else 0)
    if box is not None:
        mask.paste(255, box)
    return mask


def _masked(picture: Image.Image, mask: Image.Image, scale: float = 0.8,
            **overrides) -> GenerationRequest:
    return replace(BASE, image_prompt=ImagePrompt(
        picture.tobytes(), *picture.size, scale, mask=Picture(mask.tobytes(), *mask.size)),
        **overrides)


def test_masked_requests_share_a_call_each_with_diffusers_pixels(
        engine, tiny_sdxl_path, adapter_path):  # noqa: F811
    """One call: the left half masked (two images), the top quarter of another picture
    (a mask of another size, stretched), and a masked prompt at scale 0; each is what
    diffusers draws given its mask, the last the plain model's. Masked requests batch
    apart from unmasked ones."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    left, top = _mask((0, 0, 32, 64)), _mask((0, 0, 100, 25), size=(100, 100))
    batch = [_masked(STRIPES, left, num_outputs=2), _masked(DOTS, top, 1.2, seed=9),
             _masked(DOTS, left, 0.0, seed=11)]
    assert len({engine.batch_key(r) for r in batch}) == 1
    ours = engine.generate(batch)
    unmasked = replace(batch[0], image_prompt=replace(batch[0].image_prompt, mask=None))
    assert engine.batch_key(batch[0]) != engine.batch_key(unmasked)
    pipe = _reference(tiny_sdxl_path, adapter_path)
    processor = IPAdapterMaskProcessor()
    for request, picture, mask, scale, images in zip(batch[:2], (STRIPES, DOTS), (left, top),
                                                     (0.8, 1.2), ours, strict=False):
        pipe.set_ip_adapter_scale(scale)
        masks = processor.preprocess([mask], height=64, width=64)
        theirs = pipe(**ARGS, ip_adapter_image=picture, num_images_per_prompt=len(images),
                      generator=_seeds(*request.seeds),
                      cross_attention_kwargs={"ip_adapter_masks": [masks]}).images
        for a, b in zip(images, theirs, strict=True):
            assert_same_pixels(a, b)
    assert_same_pixels(ours[2][0], engine.generate([replace(BASE, seed=11)])[0][0])


def test_a_black_mask_leaves_the_plain_image_and_a_white_one_the_unmasked_prompts(
        engine):  # noqa: F811
    plain = engine.generate([BASE])[0][0]
    unmasked = engine.generate([replace(BASE, image_prompt=ImagePrompt(
        STRIPES.tobytes(), *STRIPES.size, 0.8))])[0][0]
    black, white, half = engine.generate([
        _masked(STRIPES, _mask(None, fill=0)), _masked(STRIPES, _mask(None)),
        _masked(STRIPES, _mask((0, 0, 32, 64)))])
    assert_same_pixels(black[0], plain)
    assert_same_pixels(white[0], unmasked)
    assert np.abs(_px(half[0]) - _px(plain)).mean() > 0.3
    assert np.abs(_px(half[0]) - _px(unmasked)).mean() > 0.3


def test_the_hires_pass_masks_its_second_size_too(engine):  # noqa: F811
    larger = {"hires_scale": 1.5, "hires_strength": 0.6}
    plain = engine.generate([replace(BASE, **larger)])[0][0]
    black, half = engine.generate([_masked(STRIPES, _mask(None, fill=0), **larger),
                                   _masked(STRIPES, _mask((0, 0, 32, 64)), **larger)])
    assert black[0].size == (96, 96)
    assert_same_pixels(black[0], plain)
    assert np.abs(_px(half[0]) - _px(plain)).mean() > 0.3


def test_the_routes_read_masks_and_refuse_them_where_they_do_not_apply():
    from serve.config import default_config
    from serve.controls import ImagePromptParams, load_extra_image_prompts, load_image_prompt
    from serve.images import ImageFetcher

    sdxl, flux = default_config().models[:2]
    fetcher = ImageFetcher([], None, None)
    mask = _mask((0, 0, 10, 20), size=(40, 30))
    given = ImagePromptParams(_text(DOTS), 0.5, mask=_text(mask.convert("RGB")))
    prompt = asyncio.run(load_image_prompt(given, sdxl, fetcher))
    assert (prompt.mask.width, prompt.mask.height) == (40, 30)
    assert prompt.mask.rgb == mask.tobytes()  # grayscale, a byte per pixel
    cases = [(ImagePromptParams(None, mask=_text(mask)), sdxl, "ip_adapter_mask"),
             (ImagePromptParams(_text(DOTS), mask="not an image"), sdxl, "ip_adapter_mask"),
             (ImagePromptParams(_text(DOTS), None, "redux_image", mask=_text(mask)), flux,
              "ip_adapter_mask")]
    for params, model, field in cases:
        with pytest.raises(InvalidField) as refused:
            asyncio.run(load_image_prompt(params, model, fetcher))
        assert refused.value.field == field
    with pytest.raises(InvalidField) as refused:
        asyncio.run(load_extra_image_prompts(
            {"face": ImagePromptParams(_text(DOTS), mask=_text(mask))}, sdxl, fetcher))
    assert refused.value.field == "extra_ip_adapters"  # the default has no further adapter
    board = replace(prompt, more=(Picture(STRIPES.tobytes(), *STRIPES.size),))
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(sdxl, "x", image_prompt=board)
    assert refused.value.field == "ip_adapter_image" and "mood boards" in refused.value.reason
