"""A request's input image for `model`: read (`load_source`: URLs first, then decoded in a
worker thread) and made into the `SourceImage` a pipeline call takes, at the size to
generate: img2img and inpainting, Kontext references, FLUX.1 Fill's outpainting, Canny's
edges and Depth's control image, and inpainting only the masked area."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from PIL import Image, ImageOps

from serve.canvases import Sides, canny, canny_thresholds, outpainted
from serve.config import ModelConfig
from serve.errors import InvalidField
from serve.images import (
    ImageFetcher,
    area_size,
    open_image,
    open_mask,
    open_with_hole,
    output_size,
    raw_bytes,
)
from serve.inpaint_area import cut_out, padded_box
from serve.request_limits import check_resizable
from serve.types import Reference, SourceImage

# An `area` of `source_image`: the input's own, shrunk to the model's limits if over them.
INPUT_AREA = 0
REFERENCES = "reference_images"  # the field of a Kontext edit's further references


async def load_source(image: str | bytes | None, mask: str | bytes | None, strength: float,
                      width: int | None, height: int | None, model: ModelConfig,
                      fetcher: ImageFetcher, hole_is_mask: bool = True,
                      area: int | None = None, outpaint: Sides | str | None = None,
                      edges: tuple[int | None, int | None] = (None, None),
                      references: Sequence[str | bytes] = (),
                      padding_mask_crop: int | None = None,
                      ) -> tuple[SourceImage | None, int | None, int | None]:
    """`source_image` for a request on the event loop: URLs read first (this server's own
    files, or allowed hosts), then the decoding done in a worker thread, so that a large image does not hold
    up the other requests of this replica."""
    if image is None and mask is None:
        if outpaint is not None:
            raise InvalidField("outpaint", "outpainting needs an image")
        if padding_mask_crop is not None:
            raise InvalidField("padding_mask_crop", "inpainting only the masked area needs an "
                                                    "image and a mask")
        if references:
            raise InvalidField(REFERENCES, "further references need an image to edit")
        canny_thresholds(edges, model)  # refused where they cannot apply
        return None, width, height
    limit = model.limits.max_image_bytes
    image = await fetcher.fetch(image, "image", limit)
    mask = await fetcher.fetch(mask, "mask", limit)
    check_references(len(references), mask is not None, model)
    references = [await fetcher.fetch(r, f"{REFERENCES}.{i}", limit)
                  for i, r in enumerate(references)]
    return await asyncio.to_thread(source_image, image, mask, strength, width, height, model,
                                   hole_is_mask, area, outpaint, edges, references,
                                   padding_mask_crop)


def check_references(count: int, masked: bool, model: ModelConfig) -> None:
    """422 on REFERENCES unless `model` can read `count` further references beside the
    image it edits (`masked`: with a mask)."""
    if not count:
        return
    if not model.kontext:
        raise InvalidField(REFERENCES, "only Kontext models read further reference images")
    if masked:
        raise InvalidField(REFERENCES, "a masked edit reads no further reference images")
    most = model.limits.max_references
    if count + 1 > most:
        raise InvalidField(f"{REFERENCES}.{most - 1}", f"at most {most} reference images per "
                                                      "edit, the edited one included")


def further_references(data: Sequence[str | bytes], area: int,
                       model: ModelConfig) -> tuple[Reference, ...]:
    """A Kontext edit's further references, each at its own shape and the output's `area`
    (as the edited image is sized), within the model's longest side."""
    nbytes, npixels = model.limits.max_image_bytes, model.limits.max_image_pixels
    out = []
    for i, value in enumerate(data):
        field = f"{REFERENCES}.{i}"
        picture = open_image(raw_bytes(value, field, nbytes), field, nbytes, npixels)
        size = area_size(picture, area, model.rules.size_multiple, model.limits.max_size)
        if picture.size != size:
            picture = picture.resize(size, Image.Resampling.LANCZOS)
        out.append(Reference(picture.tobytes(), *size))
    return tuple(out)


def source_image(image: str | bytes | None, mask: str | bytes | None, strength: float,
                 width: int | None, height: int | None, model: ModelConfig,
                 hole_is_mask: bool = True, area: int | None = None,
                 outpaint: Sides | str | None = None,
                 edges: tuple[int | None, int | None] = (None, None),
                 references: Sequence[str | bytes] = (),
                 padding_mask_crop: int | None = None,
                 ) -> tuple[SourceImage | None, int | None, int | None]:
    """Decode the `image` (and `mask`) of a request for `model`; return them at the size to
    generate, with that width and height (for no image: None and the size as given): the
    input's, unless a width or height is given, or an `area` in pixels at the input's
    shape (INPUT_AREA: the input's own, shrunk to fit the model's limits). Without a
    mask, an image's transparent part is the mask (unless not `hole_is_mask`: a
    variation's). For a Kontext model the image is a reference to edit: unless a size is
    given the output has its shape at the model's default area, and another shape crops
    it. A Fill model's mask part is drawn anew (strength 1), and with `outpaint` (pixels
    per side, or an OUTPAINT_PRESETS name; Fill and SDXL inpainting models) the image is
    first set on a larger canvas whose border is drawn too, at strength 1; a Canny
    model's image gives its Canny edges, found at the output's size with the `edges`
    thresholds (low, high; None: CANNY_THRESHOLDS'); a Depth model's is a control image
    at the output's size, whose depth map the replica estimates. A Kontext edit without a
    mask may read further `references` (`further_references`). With `padding_mask_crop`,
    only the masked area is drawn (`masked_area`)."""
    if image is None:
        if mask is not None:
            raise InvalidField("mask", "a mask needs an image")
        if references:
            raise InvalidField(REFERENCES, "further references need an image to edit")
        return None, width, height
    check_references(len(references), mask is not None, model)
    if mask is not None and (model.canny or model.depth):
        raise InvalidField("mask", "this model takes no mask: it draws the whole image, "
                                   "following the control image sent")
    thresholds = canny_thresholds(edges, model)
    picture, grey = _opened(image, mask, hole_is_mask, model)
    if padding_mask_crop is not None:
        if outpaint is not None:
            raise InvalidField("padding_mask_crop", "not with outpaint (its border is drawn "
                                                    "whole)")
        return masked_area(picture, grey, strength, width, height, model, padding_mask_crop,
                           area)
    if outpaint is not None:
        picture, grey = outpainted(picture, grey, outpaint, model)
    w, h = _generated_size(picture, strength, width, height, area, outpaint is not None, model)
    check_resizable(w, h, model)
    # Every step runs for a reference to edit, a Fill model's mask and an outpainted border.
    anew = model.kontext or model.fill or outpaint is not None
    return _sized(picture, grey, (w, h), 1.0 if anew else strength, model, thresholds,
                  references), w, h


def _sized(picture: Image.Image, grey: Image.Image | None, size: tuple[int, int],
           strength: float, model: ModelConfig, thresholds: tuple[int, int],
           references: Sequence[str | bytes]) -> SourceImage:
    """The `SourceImage` of `picture` (and its mask `grey`) at `size`: a Canny model's its
    edges (found with `thresholds`), a Depth model's the picture to estimate depth from, a
    Kontext model's a reference to edit with its further `references`."""
    edit = model.kontext

    def sized(image: Image.Image, resample: Image.Resampling) -> Image.Image:
        if image.size == size:
            return image
        # A reference (and its mask) is cropped to the output's shape, not stretched.
        return ImageOps.fit(image, size, resample) if edit else image.resize(size, resample)

    picture = sized(picture, Image.Resampling.LANCZOS)
    if model.canny:  # the edges at the output's size
        return SourceImage(canny(picture, *thresholds).tobytes(), 1.0, control=True)
    if model.depth:  # its depth map is estimated on the replica
        return SourceImage(picture.tobytes(), 1.0, control=True)
    grey = None if grey is None else sized(grey, Image.Resampling.NEAREST)
    return SourceImage(picture.tobytes(), strength, None if grey is None else grey.tobytes(),
                       edit=edit, references=further_references(references,
                                                                size[0] * size[1], model))


def _opened(image: str | bytes, mask: str | bytes | None, hole_is_mask: bool,
            model: ModelConfig) -> tuple[Image.Image, Image.Image | None]:
    """The request's picture and the grey mask of its part to repaint: the `mask`'s, or
    else the picture's transparent part (unless not `hole_is_mask`), or none on models that
    follow a control image."""
    nbytes, npixels = model.limits.max_image_bytes, model.limits.max_image_pixels
    picture, grey = open_with_hole(raw_bytes(image, "image", nbytes), "image", nbytes, npixels)
    if mask is not None:
        grey = open_mask(raw_bytes(mask, "mask", nbytes), "mask", picture, nbytes, npixels)
    elif not hole_is_mask or model.canny or model.depth:
        grey = None
    return picture, grey


def _generated_size(picture: Image.Image, strength: float, width: int | None,
                    height: int | None, area: int | None, outpainted: bool,
                    model: ModelConfig) -> tuple[int, int]:
    """The size to generate from `picture` (see `source_image`)."""
    multiple = model.rules.size_multiple
    if model.kontext and width is None and height is None and area is None:
        area = model.defaults.width * model.defaults.height  # the input's shape at it
    if area == INPUT_AREA:
        area = min(picture.width * picture.height, model.limits.max_pixels)
    if area is not None:
        width, height = area_size(picture, area, multiple, model.limits.max_size)
    # At strength 0 no step runs: unless sized, the input is answered at its own size.
    as_is = strength == 0 and (width, height, area) == (None,) * 3 and not (
        outpainted or model.kontext or model.fill or model.canny or model.depth)
    return picture.size if as_is else output_size(picture, width, height, multiple)


def masked_area(picture: Image.Image, grey: Image.Image | None, strength: float,
                width: int | None, height: int | None, model: ModelConfig,
                padding: int, area: int | None = None) -> tuple[SourceImage, int, int]:
    """Inpainting only the masked area: the region around the mask (`padding` pixels
    more each side) drawn at `width` x `height` (default: the model's default size, or
    `area` pixels at the region's shape; INPUT_AREA: the region's own), to be laid back
    into the whole picture on the replica (`serve.inpaint_area`)."""
    if grey is None:
        raise InvalidField("padding_mask_crop", "inpainting only the masked area needs a "
                                                "mask (or an image with a transparent part)")
    if model.kontext:
        raise InvalidField("padding_mask_crop", "a Kontext edit reads the whole image")
    if area is not None and width is None and height is None:
        region = grey.crop(padded_box(grey, padding))
        if area == INPUT_AREA:
            area = min(region.width * region.height, model.limits.max_pixels)
        width, height = area_size(region, area, model.rules.size_multiple,
                                  model.limits.max_size)
    w, h = width or model.defaults.width, height or model.defaults.height
    check_resizable(w, h, model)
    image, mask, overlay = cut_out(picture, grey, w, h, padding)
    return SourceImage(image.tobytes(), 1.0 if model.fill else strength, mask.tobytes(),
                       overlay=overlay), w, h
