"""Inpainting only the masked area (`padding_mask_crop`), on CPU: the cut-out's box, its two
resizes and the overlay are diffusers' VaeImageProcessor's, to the pixel; a request drawn
on the tiny SDXL and laid back gives diffusers' inpainting pipeline's image with
`padding_mask_crop`; and the requests refused."""


import numpy as np
import pytest
from PIL import Image, ImageFilter

from serve.config import ModelConfig
from serve.errors import InvalidField
from serve.inpaint_area import Overlay, crop_region, crop_resized, fill_resized
from serve.source_images import source_image
from serve.types import GenerationRequest
from tests.pictures import png_bytes

RNG = np.random.default_rng(5)
PHOTO = Image.fromarray(RNG.integers(0, 256, (120, 160, 3), dtype=np.uint8))


def _mask(box, size=(160, 120)) -> Image.Image:
    mask = Image.new("L", size)
    mask.paste(255, box)
    return mask


@pytest.fixture(scope="module")
def processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor()


@pytest.mark.parametrize(("box", "size", "pad"), [
    ((70, 50, 90, 60), (64, 64), 8),      # wide area: grown in height
    ((70, 20, 80, 100), (64, 64), 4),     # tall area: grown in width
    ((0, 0, 10, 10), (96, 64), 32),       # at a corner: moved back inside
    ((150, 100, 160, 120), (64, 96), 0),  # at the other corner, no padding
    ((10, 10, 150, 110), (64, 64), 40),   # padding past every edge
])
def test_the_box_is_diffusers_crop_region(processor, box, size, pad):
    mask = _mask(box)
    assert crop_region(mask, *size, pad) == processor.get_crop_region(mask, *size, pad=pad)


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (64, 96), (37, 53)])
def test_both_resizes_are_diffusers_to_the_pixel(processor, size):
    for image in (PHOTO, PHOTO.crop((10, 5, 60, 100)), _mask((3, 3, 40, 30)).convert("RGB")):
        assert np.array_equal(np.asarray(fill_resized(image, *size)),
                              np.asarray(processor.resize(image, size[1], size[0], "fill")))
        assert np.array_equal(np.asarray(crop_resized(image, *size)),
                              np.asarray(processor.resize(image, size[1], size[0], "crop")))


def test_the_overlay_is_diffusers_apply_overlay(processor):
    """With a soft-edged mask: grey blends the two as diffusers' does."""
    mask = _mask((40, 30, 100, 90)).filter(ImageFilter.GaussianBlur(4))
    drawn = Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    box = crop_region(mask, 64, 64, 8)
    ours = Overlay(PHOTO.tobytes(), mask.tobytes(), 160, 120, box).apply(drawn)
    theirs = processor.apply_overlay(mask, PHOTO, drawn, box)
    assert ours.size == (160, 120) and np.array_equal(np.asarray(ours), np.asarray(theirs))


MODEL = ModelConfig(id="a/b", embedded="tiny-sdxl",
                    defaults={"width": 64, "height": 64, "num_inference_steps": 4})


def test_a_request_draws_diffusers_padding_mask_crop_pixels(sdxl, tiny_sdxl_path):
    """The tiny SDXL's inpainting of a 20x10 area of a 160x120 photo at 64x64, laid back:
    the photo's own pixels outside the mask, diffusers' inside it (near the mask's edge,
    where the scaled-back cut-out also reads pixels the engine keeps exact and diffusers
    redraws, within a few levels)."""
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline

    mask = _mask((70, 50, 90, 60))
    source, width, height = source_image(png_bytes(PHOTO), png_bytes(mask), 0.8, None, None, MODEL,
                                         padding_mask_crop=8)
    assert (width, height) == (64, 64) and source.overlay.box == (62, 37, 98, 73)
    request = GenerationRequest.for_model(MODEL, "a red flower", seed=3, source=source,
                                          guidance_scale=6.0)
    assert request.output_size == (160, 120) and (request.width, request.height) == (64, 64)
    drawn = sdxl.generate([request])[0][0]
    ours = np.asarray(source.overlay.apply(drawn)).astype(int)
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_sdxl_path,
                                                            local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = np.asarray(pipe(prompt="a red flower", image=PHOTO, mask_image=mask,
                             padding_mask_crop=8, width=64, height=64, strength=0.8,
                             num_inference_steps=4, guidance_scale=6.0,
                             generator=torch.Generator().manual_seed(3)).images[0]).astype(int)
    inside = np.asarray(mask) == 255
    assert np.array_equal(ours[~inside], np.asarray(PHOTO).astype(int)[~inside])
    assert np.array_equal(theirs[~inside], ours[~inside])
    core = np.zeros_like(inside)
    core[53:57, 73:87] = True  # three pixels in from the mask's edge
    assert np.abs(ours[core] - theirs[core]).max() <= 1
    assert np.abs(ours[inside] - theirs[inside]).mean() < 3
    assert np.abs(ours[inside] - np.asarray(PHOTO).astype(int)[inside]).mean() > 5


@pytest.mark.parametrize(("args", "field", "reason"), [
    ({"mask": None}, "padding_mask_crop", "needs a mask"),
    ({"mask": _mask((0, 0, 0, 0))}, "mask", "marks nothing"),
    ({"outpaint": (8, 0, 0, 0)}, "padding_mask_crop", "not with outpaint"),
])
def test_requests_that_cannot_be_cut_out_are_refused_naming_the_field(args, field, reason):
    mask = args.get("mask", _mask((70, 50, 90, 60)))
    with pytest.raises(InvalidField, match=reason) as refused:
        source_image(png_bytes(PHOTO), None if mask is None else png_bytes(mask), 0.8, None, None,
                     MODEL if "outpaint" not in args else ModelConfig(
                         id="a/i", embedded="tiny-sdxl-inpainting", inpainting=True),
                     outpaint=args.get("outpaint"), padding_mask_crop=8)
    assert refused.value.field == field


def test_a_fill_model_draws_its_cut_out_anew():
    """FLUX.1 Fill repaints at strength 1, here as for a whole image."""
    fill = ModelConfig(id="a/f", family="flux", embedded="tiny-flux-fill", fill=True,
                       defaults={"width": 64, "height": 64})
    source, width, height = source_image(png_bytes(PHOTO), png_bytes(_mask((70, 50, 90, 60))), 0.4,
                                         None, None, fill, padding_mask_crop=8)
    assert (width, height, source.strength, source.mode) == (64, 64, 1.0, "inpaint")
    assert source.overlay.box == (62, 37, 98, 73)


def test_an_area_is_drawn_at_the_masked_regions_shape():
    """With flux-fill-dev's megapixels (an area), the region around the mask, 36x26 here
    (20x10 and 8 more each side), is drawn at that area at its shape, each side a
    multiple of 16 (rounded down): its own area gives 32x16, a quarter megapixel 592x432;
    the box is then widened to that shape."""
    from serve.source_images import INPUT_AREA

    fill = ModelConfig(id="a/f", family="flux", embedded="tiny-flux-fill", fill=True,
                       defaults={"width": 64, "height": 64},
                       limits={"max_size": 1024, "max_pixels": 1024 * 1024})
    mask = png_bytes(_mask((70, 50, 90, 60)))
    for area, size in ((INPUT_AREA, (32, 16)), (512 * 512, (592, 432))):
        source, width, height = source_image(png_bytes(PHOTO), mask, 1.0, None, None, fill,
                                             area=area, padding_mask_crop=8)
        assert (width, height) == size
        left, top, right, bottom = source.overlay.box
        assert (right - left) / (bottom - top) == pytest.approx(width / height, abs=0.05)
    sized, *_ = source_image(png_bytes(PHOTO), mask, 1.0, 48, 48, fill, area=512 * 512,
                             padding_mask_crop=8)
    assert sized.overlay.box == (62, 37, 98, 73)  # a size given wins
