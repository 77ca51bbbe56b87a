"""Input images (img2img, inpainting, and ControlNets' in `serve.controls`): read from
URLs, decoded safely, oriented and converted to RGB; transparency marks the part to
repaint, in a mask or, without one, in the image. `serve.source_images` makes a request's
input image of them.

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
from dataclasses import dataclass

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from serve.errors import InvalidField, TooLarge
from serve.files import output_name
from serve.predictions import StateStore
from serve.uploads import upload_id
from serve.urls import check_allowed_url

_FETCH_TIMEOUT_S = 10  # to connect, and between two reads
_FETCH_TOTAL_S = 60  # for the whole fetch: a host that trickles its bytes is cut off

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
            async with asyncio.timeout(_FETCH_TOTAL_S), self.client.stream(
                    "GET", url, timeout=_FETCH_TIMEOUT_S, follow_redirects=False) as response:
                if response.status_code != 200:
                    raise InvalidField(field,
                                       f"fetching {url} gave HTTP {response.status_code}")
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        break
        except httpx.HTTPError as exc:
            raise InvalidField(field, f"could not fetch {url}: {type(exc).__name__}") from None
        except TimeoutError:
            raise InvalidField(field, f"fetching {url} took over {_FETCH_TOTAL_S}s") from None
        return bytes(data)


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
