"""The images a request carries to the replica, already decoded and at their sizes: an
input image (img2img, inpainting, an edit's reference, a control image) with a Kontext
edit's further references, ControlNets' inputs, and image prompts (an IP-Adapter's or
FLUX.1 Redux's pictures). `serve.types.GenerationRequest` holds them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from serve.inpaint_area import Overlay

# Image prompts are scaled down to this on their shorter side (their encoders see 224,
# an IP-Adapter's CLIP, or 384, FLUX.1 Redux's SigLIP).
IMAGE_PROMPT_SIDE = 512
# An IP-Adapter's image prompt may be several pictures (a mood board), at most this many.
MOST_PROMPT_PICTURES = 4
# Which of an SDXL UNet's attention blocks an IP-Adapter's picture steers: every one, or
# InstantStyle's (Wang et al., 2024) style block, layout block, or both.
IPAdapterBlocks = Literal["all", "style", "layout", "style_and_layout"]


@dataclass(frozen=True, eq=False)
class Reference:
    """A further reference image of a Kontext edit, beside the edited image: RGB pixels at
    its own size (its own shape, at the output's area)."""

    rgb: bytes
    width: int
    height: int


@dataclass(frozen=True, eq=False)
class SourceImage:
    """An input image for img2img, inpainting, a Kontext edit or a FLUX.1 Canny or Depth
    model's control (Canny's edges; the picture whose depth map Depth's replica
    estimates), already at the request's size: RGB pixels, and for inpainting a mask of 8-bit
    grey (white = repaint). An edit's image is a reference the prompt changes, a control
    image the edges the output follows (every step runs: `strength` is 1); an edit may
    read `references` besides (what the prompt takes from them: an object, a style)."""

    rgb: bytes
    strength: float
    mask: bytes | None = None
    edit: bool = False
    control: bool = False
    references: tuple[Reference, ...] = ()
    # Inpainting only the masked area: the whole image this cut-out is laid back into.
    overlay: Overlay | None = None

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "edit" if self.edit else "control" if self.control else "img2img"

    @classmethod
    def blank(cls, width: int, height: int, mode: str) -> SourceImage:
        """A black image for a call of `mode` (a warm-up's): an inpainting's whole area
        masked, a control image without edges."""
        black = bytes(width * height * 3)
        if mode == "inpaint":
            return cls(black, 1.0, b"\xff" * (width * height))
        return cls(black, 1.0, edit=mode == "edit", control=mode == "control")

    @classmethod
    def warm_up(cls, modes: tuple[str, ...], width: int, height: int) -> SourceImage | None:
        """A warm-up call's input for a model of these modes: none where it draws from
        text, else a blank image for its first kind of call (FLUX.1 Fill, Canny, Depth)."""
        return None if "txt2img" in modes else cls.blank(width, height, modes[0])


@dataclass(frozen=True, eq=False)
class ControlImage:
    """A ControlNet's input, already at the request's size (and through the ControlNet's
    preprocessing): which of the model's ControlNets, its RGB pixels, how strongly it
    steers, and the fractions of the steps it steers (from `start` to `end`)."""

    name: str
    rgb: bytes
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    @property
    def key(self) -> tuple:
        """Requests whose ControlNets have equal keys, in order, can share a call (the
        pipeline takes each ControlNet's scale and step range once per call)."""
        return (self.name, self.scale, self.start, self.end)


class Picture(NamedTuple):
    """An image prompt's picture: RGB pixels and their size."""

    rgb: bytes
    width: int
    height: int


@dataclass(frozen=True, eq=False)
class ImagePrompt:
    """An IP-Adapter's or FLUX.1 Redux's input: a picture (RGB pixels, its own size, at most
    IMAGE_PROMPT_SIDE on its shorter side) whose content and style the image takes on,
    and how strongly: an IP-Adapter's `scale`, or the factor by which Redux's grid of
    picture tokens is averaged down (`downsampling`; 1 keeps them all). An IP-Adapter's
    may hold `more` pictures (a mood board): the adapter reads all their image tokens
    together, as diffusers' does given a list of pictures for one adapter. An SDXL
    IP-Adapter's single picture may have a `mask` (grayscale, its own size): the picture
    steers only the image's white part (diffusers' `ip_adapter_masks`), and it may steer
    only some of the UNet's attention `blocks` (InstantStyle's)."""

    rgb: bytes
    width: int
    height: int
    scale: float
    downsampling: int = 1
    more: tuple[Picture, ...] = ()
    mask: Picture | None = None  # its pixels grayscale, a byte each
    blocks: IPAdapterBlocks = "all"

    @property
    def pictures(self) -> tuple[Picture, ...]:
        """Its first picture and its further ones."""
        return (Picture(self.rgb, self.width, self.height), *self.more)
