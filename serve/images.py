"""Input images (img2img, inpainting, and ControlNets' in `serve.controls`): decoded
safely, oriented and converted to RGB; transparency marks the part to repaint, in a mask
or, without one, in the image.

Limits are checked before the pixels are decoded: the encoded size first, then the
width and height from the file's header, so a small file that claims huge dimensions (a
decompression bomb) is refused without allocating its pixels.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from serve.canvases import Sides, canny, canny_thresholds, outpainted
from serve.config import ModelConfig
from serve.errors import InvalidField, TooLarge
from serve.files import output_name
from serve.inpaint_area import cut_out, padded_box
from serve.predictions import StateStore
from serve.types import Reference, SourceImage
from serve.uploads import upload_id
from serve.urls import check_allowed_url

_FETCH_TIMEOUT_S = 10

_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[\w=.-]+)*?;base64,(?P<data>.*)$",
                       re.DOTALL)
_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def decode_base64(value: str, field: str, max_bytes: int) -> bytes:
    """Bytes of a data URI or plain base64 string; 413 when over `max_bytes`."""
    match = _DATA_URI.match(value.strip())
    text = match["data"] if match else value.strip()
    if len(text) * 3 // 4 > max_bytes:
        raise TooLarge(field, f"image data is over {max_bytes} bytes")
    if not match and text.startswith(("http://", "https://")):
        raise InvalidField(field, "image URLs are fetched only from the hosts in "
                                  "image_allowed_hosts or this server's own files; send a "
                                  "data URI or base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidField(field, "is neither a data URI nor valid base64") from None


@dataclass(frozen=True)
class ImageFetcher:
    """Where input image URLs are read from: this server's own files (uploads to its files
    API, and its outputs, so one prediction's output can be the next one's input) straight
    from the store, anything else from the hosts the operator allowed."""

    allowed_hosts: list[str]
    client: httpx.AsyncClient
    store: StateStore

    async def fetch(self, value: str | bytes | None, field: str,
                    max_bytes: int) -> str | bytes | None:
        """The bytes behind an http(s) URL; any other value as it is. 413 past
        `max_bytes`, 422 if the URL is refused or its fetch fails."""
        if not isinstance(value, str) or not value.strip().startswith(("http://", "https://")):
            return value
        url = value.strip()
        data = await self._stored(url, field)
        if data is None:
            check_allowed_url(url, self.allowed_hosts, field, "image_allowed_hosts")
            data = await self._get(url, field, max_bytes)
        if len(data) > max_bytes:
            raise TooLarge(field, f"the image at {url} is over {max_bytes} bytes")
        return data

    async def _stored(self, url: str, field: str) -> bytes | None:
        """An upload's bytes (422 if it is gone), or an output file's (None if gone)."""
        uploaded = upload_id(url)
        if uploaded is not None:
            data = await self.store.upload_data(uploaded)
            if data is None:
                raise InvalidField(field, f"no uploaded file {uploaded} (uploads are kept "
                                          "file_ttl_s)")
            return data
        name = output_name(url)
        stored = await self.store.get_file(name) if name else None
        return stored.data if stored else None

    async def _get(self, url: str, field: str, max_bytes: int) -> bytes:
        data = bytearray()
        try:
            async with self.client.stream("GET", url, timeout=_FETCH_TIMEOUT_S,
                                          follow_redirects=False) as response:
                if response.status_code != 200:
                    raise InvalidField(field,
                                       f"fetching {url} gave HTTP {response.status_code}")
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        break
        except httpx.HTTPError as exc:
            raise InvalidField(field, f"could not fetch {url}: {type(exc).__name__}") from None
        return bytes(data)


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


def open_image(data: bytes, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode `data` into an RGB image with its EXIF orientation applied and any
    transparency flattened onto white. 413 over `max_bytes` or `max_pixels` (checked
    from the header, before decoding), 422 for data that is not a supported image."""
    return _to_rgb(_decoded(data, field, max_bytes, max_pixels))


def open_with_hole(data: bytes, field: str, max_bytes: int,
                   max_pixels: int) -> tuple[Image.Image, Image.Image | None]:
    """`open_image`, and the image's transparent part as a mask (8-bit grey, white where
    it is fully transparent), or None for an image without transparency: as OpenAI's
    edits and Replicate's flux-fill-dev take an image with no mask."""
    image = _decoded(data, field, max_bytes, max_pixels)
    return _to_rgb(image), _transparent_part(image)


def _decoded(data: bytes, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    if len(data) > max_bytes:
        raise TooLarge(field, f"image data is over {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise TooLarge(field, f"image is {width}x{height}, over {max_pixels} pixels")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge(field, f"image is over {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidField(field, f"cannot be decoded as an image ({exc})") from None
    return ImageOps.exif_transpose(image)


def _with_alpha(image: Image.Image) -> Image.Image | None:
    """The image as RGBA if it has an alpha channel (or a palette transparency)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    rgba = _with_alpha(image)
    if rgba is None:
        return image.convert("RGB")
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    return white


def _transparent_part(image: Image.Image) -> Image.Image | None:
    """255 - alpha (a half-transparent edge is repainted half), or None if opaque."""
    rgba = _with_alpha(image)
    if rgba is None:
        return None
    alpha = rgba.getchannel("A")
    return None if alpha.getextrema()[0] == 255 else ImageOps.invert(alpha)


def open_mask(data: bytes, field: str, image: Image.Image, max_bytes: int,
              max_pixels: int) -> Image.Image:
    """A mask of the same size as `image`, in 8-bit grey (white = repaint). A mask with
    transparency is read as OpenAI's are: its transparent part is repainted, whatever its
    colours; an opaque one by its grey levels."""
    decoded = _decoded(data, field, max_bytes, max_pixels)
    mask = _transparent_part(decoded)
    mask = _to_rgb(decoded).convert("L") if mask is None else mask
    if mask.size != image.size:
        raise InvalidField(field, f"mask is {mask.width}x{mask.height} but the image is "
                                  f"{image.width}x{image.height}")
    return mask


def marked_up(image: bytes, markup: bytes, max_bytes: int, max_pixels: int) -> bytes:
    """The `image` with `markup` laid over it, as a PNG: OpenAI's edit markup, a
    transparent PNG of the image's size (after orientation) whose strokes (arrows,
    circles, scribbles, patches of colour) guide the edit, which redraws the picture as
    marked. The image keeps its own transparent part where no stroke covers it. 400 on
    `markup` for one of another size or with no transparent pixel."""
    picture = _decoded(image, "image", max_bytes, max_pixels).convert("RGBA")
    marks = _with_alpha(_decoded(markup, "markup", max_bytes, max_pixels))
    if marks is None or marks.getchannel("A").getextrema()[0] == 255:
        raise InvalidField("markup", "must be a PNG with transparent pixels, its marks "
                                     "opaque on a transparent ground")
    if marks.size != picture.size:
        raise InvalidField("markup", f"markup is {marks.width}x{marks.height} but the image "
                                     f"is {picture.width}x{picture.height}")
    out = io.BytesIO()
    Image.alpha_composite(picture, marks).save(out, "PNG")
    return out.getvalue()


def output_size(image: Image.Image, width: int | None, height: int | None,
                multiple: int = 8) -> tuple[int, int]:
    """The size to generate: the input's unless given, each rounded down to a multiple of
    `multiple` (at least `multiple`)."""
    w, h = width or image.width, height or image.height
    return max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)


def area_size(image: Image.Image, area: int, multiple: int,
              longest: int | None = None) -> tuple[int, int]:
    """The size of `area` pixels with the image's aspect ratio, each side rounded down to a
    multiple of `multiple`, as diffusers' Kontext pipeline sizes its output (`max_area`);
    a longer side than `longest` shrinks both to fit (a panorama keeps its shape)."""
    aspect = image.width / image.height
    width, height = (area * aspect) ** 0.5, (area / aspect) ** 0.5
    if longest is not None and max(width, height) > longest:
        shrink = longest / max(width, height)
        width, height = width * shrink, height * shrink
    return (max(multiple, round(width) // multiple * multiple),
            max(multiple, round(height) // multiple * multiple))


def raw_bytes(value: str | bytes, field: str, max_bytes: int) -> bytes:
    """Raw bytes (an upload) as they are; a string is a data URI or base64."""
    return value if isinstance(value, bytes) else decode_base64(value, field, max_bytes)


# An `area` of `source_image`: the input's own, shrunk to the model's limits if over them.
INPUT_AREA = 0
REFERENCES = "reference_images"  # the field of a Kontext edit's further references


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
    nbytes, npixels = model.limits.max_image_bytes, model.limits.max_image_pixels
    controlled = model.canny or model.depth
    if mask is not None and controlled:
        raise InvalidField("mask", "this model takes no mask: it draws the whole image, "
                                   "following the control image sent")
    thresholds = canny_thresholds(edges, model)
    picture, grey = open_with_hole(raw_bytes(image, "image", nbytes), "image", nbytes, npixels)
    if mask is not None:
        grey = open_mask(raw_bytes(mask, "mask", nbytes), "mask", picture, nbytes, npixels)
    elif not hole_is_mask or controlled:
        grey = None
    if padding_mask_crop is not None:
        if outpaint is not None:
            raise InvalidField("padding_mask_crop", "not with outpaint (its border is drawn "
                                                    "whole)")
        return masked_area(picture, grey, strength, width, height, model, padding_mask_crop,
                           area)
    if outpaint is not None:
        picture, grey = outpainted(picture, grey, outpaint, model)
    multiple = model.rules.size_multiple
    if model.kontext and width is None and height is None and area is None:
        area = model.defaults.width * model.defaults.height  # the input's shape at it
    if area == INPUT_AREA:
        area = min(picture.width * picture.height, model.limits.max_pixels)
    if area is not None:
        width, height = area_size(picture, area, multiple, model.limits.max_size)
    # At strength 0 no step runs: unless sized, the input is answered at its own size.
    as_is = strength == 0 and (width, height, area, outpaint) == (None,) * 4 and not (
        model.kontext or model.fill or controlled)
    w, h = picture.size if as_is else output_size(picture, width, height, multiple)
    edit = model.kontext  # a reference to edit: every step runs

    def sized(image: Image.Image, resample: Image.Resampling) -> Image.Image:
        if image.size == (w, h):
            return image
        # A reference (and its mask) is cropped to the output's shape, not stretched.
        return ImageOps.fit(image, (w, h), resample) if edit else image.resize((w, h), resample)

    picture = sized(picture, Image.Resampling.LANCZOS)
    if model.canny:  # the edges at the output's size
        return SourceImage(canny(picture, *thresholds).tobytes(), 1.0, control=True), w, h
    if model.depth:  # its depth map is estimated on the replica
        return SourceImage(picture.tobytes(), 1.0, control=True), w, h
    grey = None if grey is None else sized(grey, Image.Resampling.NEAREST)
    anew = edit or model.fill or outpaint is not None  # every step runs
    return SourceImage(picture.tobytes(), 1.0 if anew else strength,
                       None if grey is None else grey.tobytes(), edit=edit,
                       references=further_references(references, w * h, model)), w, h



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
    image, mask, overlay = cut_out(picture, grey, w, h, padding)
    return SourceImage(image.tobytes(), 1.0 if model.fill else strength, mask.tobytes(),
                       overlay=overlay), w, h
