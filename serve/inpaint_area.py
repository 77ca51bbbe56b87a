"""Inpainting only the masked area (diffusers' `padding_mask_crop`, the WebUI's "inpaint
only masked"): the region around the mask, with `padding` pixels more on each side and
widened to the shape of the size drawn at, is cut out of the image, drawn at that size
(far more pixels for a small region: a face, a hand in a large photo), then scaled back
and laid into the untouched image through its mask.

The arithmetic is diffusers' (VaeImageProcessor's get_crop_region, its "fill" and "crop"
resizes and apply_overlay), with PIL alone, so a request gives the pixels diffusers'
inpainting pipelines give with `padding_mask_crop`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from serve.errors import InvalidField

Box = tuple[int, int, int, int]  # left, top, right, bottom


@dataclass(frozen=True, eq=False)
class Overlay:
    """What an inpainting request drawn at a cut-out's size is laid into: the whole input
    image (RGB) and its mask (8-bit grey, white = repainted), and where the cut-out was."""

    rgb: bytes
    mask: bytes
    width: int
    height: int
    box: Box

    def apply(self, drawn: Image.Image) -> Image.Image:
        """The drawn cut-out scaled into its box (to fit, the excess cropped), and the input
        image over it wherever its mask keeps it (grey: in between)."""
        size = (self.width, self.height)
        kept = Image.new("RGBa", size)
        mask = Image.frombytes("L", size, self.mask)
        kept.paste(Image.frombytes("RGB", size, self.rgb).convert("RGBA").convert("RGBa"),
                   mask=ImageOps.invert(mask))
        left, top, right, bottom = self.box
        canvas = Image.new("RGBA", size)
        canvas.paste(crop_resized(drawn, right - left, bottom - top), (left, top))
        canvas.alpha_composite(kept.convert("RGBA"))
        return canvas.convert("RGB")


def cut_out(picture: Image.Image, grey: Image.Image, width: int, height: int,
            padding: int) -> tuple[Image.Image, Image.Image, Overlay]:
    """The picture and its mask cut around the mask and drawn at `width` x `height`, the
    mask made black and white (at half grey, as diffusers' mask processor does), and the
    Overlay that lays the drawn cut-out back into the picture."""
    box = crop_region(grey, width, height, padding)
    image = fill_resized(picture.crop(box), width, height)
    mask = fill_resized(grey.crop(box), width, height).convert("L")
    mask = mask.point(lambda v: 255 if v >= 128 else 0)
    return image, mask, Overlay(picture.tobytes(), grey.tobytes(), *picture.size, box)


def padded_box(mask: Image.Image, padding: int) -> Box:
    """The box holding every masked (non-black) pixel, `padding` wider on each side within
    the image. 422 on the mask if it marks nothing."""
    marked = np.asarray(mask.convert("L")) != 0
    columns, rows = np.flatnonzero(marked.any(axis=0)), np.flatnonzero(marked.any(axis=1))
    if not len(columns):
        raise InvalidField("mask", "the mask marks nothing to repaint (it is all black)")
    w, h = mask.size
    return (max(int(columns[0]) - padding, 0), max(int(rows[0]) - padding, 0),
            min(int(columns[-1]) + 1 + padding, w), min(int(rows[-1]) + 1 + padding, h))


def crop_region(mask: Image.Image, width: int, height: int, padding: int) -> Box:
    """The `padded_box` grown along one axis to the shape of `width` x `height` (kept
    inside the image where it can be)."""
    w, h = mask.size
    x1, y1, x2, y2 = padded_box(mask, padding)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _widened(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = _widened(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def _widened(start: int, end: int, more: int, most: int) -> tuple[int, int]:
    """[start, end) grown by `more` pixels, centred, then moved back inside [0, most)."""
    start, end = start - more // 2, end + more - more // 2
    if end >= most:
        start, end = start - (end - most), most
    if start < 0:
        start, end = 0, end - start
    return start, min(end, most)


def fill_resized(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image scaled to fit `width` x `height` with its shape kept, centred, the bands
    left on two sides filled by stretching its edge rows or columns (diffusers' "fill")."""
    ratio, own = width / height, image.width / image.height
    w = width if ratio < own else image.width * height // image.height
    h = height if ratio >= own else image.height * width // image.width
    scaled = image.resize((w, h), resample=Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(scaled, box=(width // 2 - w // 2, height // 2 - h // 2))
    if ratio < own and (band := height // 2 - h // 2) > 0:
        out.paste(scaled.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(scaled.resize((width, band), box=(0, h, width, h)), box=(0, band + h))
    elif ratio > own and (band := width // 2 - w // 2) > 0:
        out.paste(scaled.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(scaled.resize((band, height), box=(w, 0, w, height)), box=(band + w, 0))
    return out


def crop_resized(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image scaled to cover `width` x `height` with its shape kept, centred, the
    excess cropped (diffusers' "crop")."""
    ratio, own = width / height, image.width / image.height
    w = width if ratio > own else image.width * height // image.height
    h = height if ratio <= own else image.height * width // image.width
    scaled = image.resize((w, h), resample=Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(scaled, box=(width // 2 - w // 2, height // 2 - h // 2))
    return out
