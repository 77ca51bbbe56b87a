"""Pictures several tests draw from."""

import io

from PIL import Image, ImageDraw


def scene(flip: bool = False) -> Image.Image:
    """96x64: a bright square and a dark disc on a mid-grey ground (mirrored with `flip`):
    sharp edges, and a layout a depth estimator or an edge finder tells from its mirror."""
    image = Image.new("RGB", (96, 64), (120, 120, 120))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 40, 40), fill=(240, 230, 220))
    draw.ellipse((55, 15, 85, 45), fill=(20, 30, 40))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def png_bytes(picture, mode: str | None = None) -> bytes:
    """A PIL image, or an array as PIL reads it (in `mode`), as PNG bytes."""
    if not isinstance(picture, Image.Image):
        picture = Image.fromarray(picture, mode)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()
