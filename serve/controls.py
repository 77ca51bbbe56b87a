"""ControlNets' inputs and image prompts (an SDXL model's IP-Adapter's, a FLUX model's
Redux's) as the routes take them: the request's fields (one ControlNet, or a list), checked
against the model's ControlNets, and their control images decoded as input images are, at
the size to generate, through each ControlNet's preprocessing (Canny); an image prompt
decoded the same way, at its own size."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from serve.canvases import canny, canny_thresholds
from serve.config import ControlNetConfig, ModelConfig
from serve.errors import InvalidField
from serve.images import ImageFetcher, open_image, output_size, raw_bytes
from serve.request_limits import check_resizable, unknown_controlnet, unknown_ip_adapter
from serve.types import (
    IMAGE_PROMPT_SIDE,
    ControlImage,
    ImagePrompt,
    IPAdapterBlocks,
    Picture,
)


class ControlRef(BaseModel):
    """One ControlNet of a request's `controlnets` list (JSON)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description=(
        "The control image: a data URI, base64, or an http(s) URL on a host in "
        "image_allowed_hosts."))
    name: str | None = Field(None, description="Which ControlNet; default: the model's first.")
    conditioning_scale: float | None = Field(None, ge=0, le=4, description=(
        "How strongly it steers; default: the ControlNet's own."))
    start: float = Field(0.0, ge=0, lt=1, description=(
        "The fraction of the steps after which it starts to steer."))
    end: float = Field(1.0, gt=0, le=1, description="The fraction after which it stops.")

    def params(self, field: str) -> ControlParams:
        """As `load_controls` takes it, its errors naming `field`.name, .image, .start."""
        return ControlParams(self.image, self.name, self.conditioning_scale, self.start,
                             self.end, (f"{field}.name", f"{field}.image", f"{field}.start"))


def listed(refs: Sequence[ControlRef], field: str = "controlnets") -> list[ControlParams]:
    """A request's `controlnets` list as `load_controls` takes it."""
    return [ref.params(f"{field}.{i}") for i, ref in enumerate(refs)]


@dataclass(frozen=True)
class ControlParams:
    """One ControlNet of a request as its route took it (None: the model's first
    ControlNet, that ControlNet's scale), and the route's names of its name, image and
    start fields, for errors."""

    image: str | bytes | None
    name: str | None = None
    scale: float | None = None
    start: float = 0.0
    end: float = 1.0
    fields: tuple[str, str, str] = ("controlnet", "control_image", "control_guidance_start")


async def load_controls(params: Sequence[ControlParams], width: int | None,
                        height: int | None, model: ModelConfig, fetcher: ImageFetcher,
                        size_from: int = 0, edges: tuple[int | None, int | None] = (None, None),
                        ) -> tuple[tuple[ControlImage, ...], int | None, int | None]:
    """The request's control images at the size to generate, through their ControlNets'
    preprocessing (Canny's with the `edges` thresholds, low and high, where given), with
    that size: `width` and `height` where given, else control image `size_from`'s own
    (rounded down as an input image's). For none: (), and the size as given. More than the
    model's `limits.max_controlnets` are refused before any is read."""
    most = model.limits.max_controlnets
    if len(params) > most:
        raise InvalidField(params[most].fields[0], f"at most {most} ControlNets per request "
                                                   "for this model")
    nets = [_controlnet(p, model) for p in params]
    if not params:
        return (), width, height
    limit = model.limits.max_image_bytes
    data = [await fetcher.fetch(p.image, p.fields[1], limit) for p in params]
    pixels, w, h = await asyncio.to_thread(_control_pixels, params, nets, data, width, height,
                                           model, size_from, canny_thresholds(edges, model))
    return tuple(ControlImage(net_name, rgb, net.conditioning_scale if p.scale is None
                              else p.scale, p.start, p.end)
                 for p, (net_name, net), rgb in zip(params, nets, pixels, strict=True)), w, h


def _controlnet(params: ControlParams, model: ModelConfig) -> tuple[str, ControlNetConfig]:
    """The (name, config) of the ControlNet `params` names; 422 on the right field."""
    name_field, image_field, start_field = params.fields
    if params.image is None:
        raise InvalidField(image_field, f"{name_field} needs a control image")
    if not model.controlnets:
        raise InvalidField(image_field, "this model has no ControlNet (its config sets none)")
    name = params.name or next(iter(model.controlnets))
    if name not in model.controlnets:
        raise unknown_controlnet(model, name, name_field)
    if not params.start < params.end:
        raise InvalidField(start_field, "the start of a ControlNet's steps must be below "
                                        "their end")
    return name, model.controlnets[name]


def _control_pixels(params: Sequence[ControlParams], nets: Sequence[tuple[str, ControlNetConfig]],
                    data: Sequence[str | bytes], width: int | None, height: int | None,
                    model: ModelConfig, size_from: int,
                    thresholds: tuple[int, int]) -> tuple[list[bytes], int, int]:
    pictures = [_opened(d, p.fields[1], model) for p, d in zip(params, data, strict=True)]
    w, h = output_size(pictures[size_from], width, height, model.rules.size_multiple)
    check_resizable(w, h, model)
    out = []
    for picture, (_, net) in zip(pictures, nets, strict=True):
        if picture.size != (w, h):
            picture = picture.resize((w, h), Image.Resampling.LANCZOS)
        out.append((canny(picture, *thresholds) if net.preprocess == "canny"
                    else picture).tobytes())
    return out, w, h


# An image prompt's picture as a route takes it (a data URI, base64, an allowed URL, or a
# file's bytes), or an IP-Adapter's mood board: a list of them.
PromptImages = str | bytes | Sequence[str]


class ImagePromptParams(NamedTuple):
    """A request's image prompt as a route reads it: its picture or pictures, its scale if
    given, and the field it came in."""

    image: PromptImages | None
    scale: float | None = None
    field: str = "ip_adapter_image"
    downsampling: int | None = None  # FLUX.1 Redux's
    mask: str | bytes | None = None  # an SDXL IP-Adapter's
    blocks: IPAdapterBlocks = "all"  # an SDXL IP-Adapter's


_PROMPT_FIELDS = ("ip_adapter_image", "redux_image")


def image_prompt_params(params: Any) -> ImagePromptParams:
    """The image prompt of a route's params, which may send one as ip_adapter_image (for
    a model's IP-Adapter, with ip_adapter_scale) or as redux_image (for a FLUX
    model's Redux, with redux_downsampling); 422 if both."""
    if params.ip_adapter_image is not None and params.redux_image is not None:
        raise InvalidField("redux_image", "send one image prompt: ip_adapter_image (models "
                                          "with an IP-Adapter) or redux_image (with Redux)")
    mask, blocks = params.ip_adapter_mask, params.ip_adapter_blocks
    if params.redux_image is not None:
        return ImagePromptParams(params.redux_image, None, "redux_image",
                                 params.redux_downsampling, mask, blocks)
    return ImagePromptParams(params.ip_adapter_image, params.ip_adapter_scale, mask=mask,
                             blocks=blocks)


async def load_image_prompt(given: ImagePromptParams, model: ModelConfig,
                            fetcher: ImageFetcher) -> ImagePrompt | None:
    """The request's image prompt for the model's IP-Adapter or Redux (None: it sends
    none), read as `_prompt_pictures` reads it; its scale the IP-Adapter's own and its
    downsampling Redux's own unless given. 422 on its field for a model that reads none,
    or reads it from the other field."""
    image, scale, field, downsampling, mask, blocks = given
    if image is None:
        if mask is not None:
            raise InvalidField("ip_adapter_mask", f"a mask needs its picture in {field}")
        return None
    reader = model.ip_adapter or model.redux
    if reader is None:
        raise InvalidField(field, "this model reads no image prompts (its config sets no "
                                  "IP-Adapter or Redux)")
    if field in _PROMPT_FIELDS and field != model.image_prompt_field:
        raise InvalidField(field, "this model reads its image prompt from "
                                  f"{model.image_prompt_field}")
    pictures = await _prompt_pictures(image, field, model, fetcher)
    mask = await _prompt_mask(mask, "ip_adapter_mask", model, fetcher)
    _check_blocks(blocks, "ip_adapter_blocks", model)
    if model.ip_adapter is not None:
        return _image_prompt(pictures, reader.scale if scale is None else scale, mask=mask,
                             blocks=blocks)
    return _image_prompt(pictures, 1.0, downsampling or reader.downsampling)


async def load_extra_image_prompts(given: Mapping[str, ImagePromptParams],
                                   model: ModelConfig, fetcher: ImageFetcher,
                                   field: str = "extra_ip_adapters",
                                   ) -> tuple[tuple[str, ImagePrompt], ...]:
    """The image prompts for the model's further IP-Adapters (`ip_adapter.extra`), by
    name, read as the first adapter's is, each at its adapter's scale unless given. 422 on
    `field` for a name the model does not hold."""
    extra = model.extra_ip_adapters
    for name in given:
        if name not in extra:
            raise unknown_ip_adapter(model, name, field)

    async def read(name: str, params: ImagePromptParams) -> tuple:
        pictures = await _prompt_pictures(params.image, f"{field}.{name}.image", model,
                                          fetcher)
        scale = extra[name].scale if params.scale is None else params.scale
        return name, _image_prompt(pictures, scale, mask=await _prompt_mask(
            params.mask, f"{field}.{name}.mask", model, fetcher), blocks=params.blocks)

    return tuple(await asyncio.gather(*(read(name, p) for name, p in given.items())))


async def _prompt_pictures(images: PromptImages, field: str, model: ModelConfig,
                           fetcher: ImageFetcher) -> list[Image.Image]:
    """An image prompt's pictures: one, or a mood board's list (`field`.i names the i-th
    in errors), each read as an input image is and scaled down to IMAGE_PROMPT_SIDE on its
    shorter side."""
    if isinstance(images, str | bytes):
        named = [(images, field)]
    else:
        named = [(image, f"{field}.{i}") for i, image in enumerate(images)]

    async def read(image: str | bytes, name: str) -> Image.Image:
        data = await fetcher.fetch(image, name, model.limits.max_image_bytes)
        return await asyncio.to_thread(_prompt_picture, data, name, model)

    return list(await asyncio.gather(*(read(*pair) for pair in named)))


async def _prompt_mask(mask: str | bytes | None, field: str, model: ModelConfig,
                       fetcher: ImageFetcher) -> Picture | None:
    """An SDXL IP-Adapter's image prompt's mask, read as an input image is, grayscale;
    422 on `field` for a FLUX model's."""
    if mask is None:
        return None
    if model.family != "sdxl":
        raise InvalidField(field, "masks are for SDXL models' IP-Adapters")
    data = await fetcher.fetch(mask, field, model.limits.max_image_bytes)
    picture = await asyncio.to_thread(lambda: _opened(data, field, model).convert("L"))
    return Picture(picture.tobytes(), *picture.size)


def _check_blocks(blocks: str, field: str, model: ModelConfig) -> None:
    if blocks != "all" and model.family != "sdxl":
        raise InvalidField(field, "only SDXL models' IP-Adapters steer chosen blocks")


def _image_prompt(pictures: Sequence[Image.Image], scale: float, downsampling: int = 1,
                  mask: Picture | None = None, blocks: IPAdapterBlocks = "all") -> ImagePrompt:
    first, *more = pictures
    return ImagePrompt(first.tobytes(), *first.size, scale, downsampling,
                       tuple(Picture(p.tobytes(), *p.size) for p in more), mask, blocks)


def _opened(data: str | bytes, field: str, model: ModelConfig) -> Image.Image:
    """An input image the route fetched, decoded within the model's limits (422 on
    `field`)."""
    nbytes, npixels = model.limits.max_image_bytes, model.limits.max_image_pixels
    return open_image(raw_bytes(data, field, nbytes), field, nbytes, npixels)


def _prompt_picture(data: str | bytes, field: str, model: ModelConfig) -> Image.Image:
    picture = _opened(data, field, model)
    shorter = min(picture.size)
    if shorter <= IMAGE_PROMPT_SIDE:
        return picture
    size = [max(1, round(side * IMAGE_PROMPT_SIDE / shorter)) for side in picture.size]
    return picture.resize(size, Image.Resampling.LANCZOS)
