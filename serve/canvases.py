"""What the FLUX.1 tools do to an input image before it is a request's: Fill's outpainting
canvas (the image on a larger canvas, its border to draw; SDXL inpainting checkpoints
take it too) and Canny's edges."""

from __future__ import annotations

from PIL import Image

from serve.config import ModelConfig
from serve.errors import InvalidField

Sides = tuple[int, int, int, int]  # pixels added on the left, top, right and bottom


# Replicate's flux-fill-pro outpainting presets, as fractions of the image's width and
# height added on its (left, top, right, bottom); "Make square" is worked out per image.
OUTPAINT_PRESETS = {"Zoom out 1.5x": (0.25, 0.25, 0.25, 0.25),
                    "Zoom out 2x": (0.5, 0.5, 0.5, 0.5), "Make square": None,
                    "Left outpaint": (0.5, 0, 0, 0), "Right outpaint": (0, 0, 0.5, 0),
                    "Top outpaint": (0, 0.5, 0, 0), "Bottom outpaint": (0, 0, 0, 0.5)}
def outpaint_sides(preset: str, width: int, height: int) -> Sides:
    """The pixels an OUTPAINT_PRESETS preset adds around an image of `width` x `height`:
    zooming out by 1.5 or 2 centres it on a canvas that much larger each way, a side's
    outpaint adds half the image's size there, and "Make square" pads its shorter side
    to the longer one's length, centred."""
    if preset == "Make square":
        wide, tall = max(0, height - width), max(0, width - height)
        return wide // 2, tall // 2, wide - wide // 2, tall - tall // 2
    left, top, right, bottom = OUTPAINT_PRESETS[preset]
    return (round(left * width), round(top * height), round(right * width),
            round(bottom * height))


def expanded(picture: Image.Image, grey: Image.Image | None,
             sides: Sides) -> tuple[Image.Image, Image.Image]:
    """The picture on a canvas `sides` larger (left, top, right, bottom), and the mask of
    the canvas: white on the added border (drawn anew), the picture's own mask (or black:
    kept) inside it."""
    left, top, right, bottom = sides
    size = (picture.width + left + right, picture.height + top + bottom)
    canvas, mask = Image.new("RGB", size, (255, 255, 255)), Image.new("L", size, 255)
    canvas.paste(picture, (left, top))
    mask.paste(grey if grey is not None else Image.new("L", picture.size, 0), (left, top))
    return canvas, mask


def canny(picture: Image.Image, low: int, high: int) -> Image.Image:
    """OpenCV's Canny edges of the picture's grey levels, white on black, as RGB: the
    control images canny ControlNets were trained on (with these thresholds), and FLUX.1
    Canny's (50 and 200, as Black Forest Labs' API)."""
    import cv2
    import numpy as np

    edges = cv2.Canny(np.asarray(picture.convert("L")), low, high)
    return Image.fromarray(edges).convert("RGB")


# FLUX.1 Canny's edge thresholds (Black Forest Labs' API defaults), and canny ControlNets'
# (those their training images were made with).
CANNY_THRESHOLDS = (50, 200)
CONTROLNET_CANNY_THRESHOLDS = (100, 200)


def outpainted(picture: Image.Image, grey: Image.Image | None, outpaint: Sides | str,
                model: ModelConfig) -> tuple[Image.Image, Image.Image]:
    """`expanded` for a Fill model or an SDXL inpainting checkpoint; 422 on outpaint for
    another model or a canvas over the model's input-pixel limit."""
    if not (model.fill or model.inpainting):
        raise InvalidField("outpaint", "only FLUX.1 Fill models (fill: true) and SDXL "
                                       "inpainting checkpoints (inpainting: true) outpaint")
    sides = outpaint_sides(outpaint, *picture.size) if isinstance(outpaint, str) else outpaint
    width, height = picture.width + sides[0] + sides[2], picture.height + sides[1] + sides[3]
    if width * height > model.limits.max_image_pixels:
        raise InvalidField("outpaint", f"the canvas would be {width}x{height}, over this "
                                       f"model's {model.limits.max_image_pixels} input pixels")
    return expanded(picture, grey, sides)


def finds_edges(model: ModelConfig) -> bool:
    """Whether `model` finds Canny edges in pictures: a FLUX.1 Canny model, or one with a
    canny ControlNet."""
    return model.canny or any(n.preprocess == "canny" for n in model.controlnets.values())


def canny_thresholds(edges: tuple[int | None, int | None],
                     model: ModelConfig) -> tuple[int, int]:
    """The edge thresholds (low, high) of a Canny model's image or a canny ControlNet's
    control images, the defaults (CANNY_THRESHOLDS, CONTROLNET_CANNY_THRESHOLDS) where not
    given; 422 naming the field given to a model that finds no edges, or a low one over
    the high one."""
    defaults = CANNY_THRESHOLDS if model.canny else CONTROLNET_CANNY_THRESHOLDS
    low, high = (default if given is None else given
                 for given, default in zip(edges, defaults, strict=True))
    if not finds_edges(model) and edges != (None, None):
        field = "canny_low_threshold" if edges[0] is not None else "canny_high_threshold"
        raise InvalidField(field, "this model finds no edges: only FLUX.1 Canny models "
                                  "(canny: true) and canny ControlNets (preprocess: canny) do")
    if low > high:
        raise InvalidField("canny_low_threshold", f"{low} is over the high threshold {high}")
    return low, high
