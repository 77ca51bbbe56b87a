"""Image encoding, done on the replica so only compressed bytes travel back."""

from __future__ import annotations

import io

from PIL import Image

_PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}


def encode_image(image: Image.Image, fmt: str, quality: int) -> bytes:
    """Encode to png (lossless, `quality` ignored), webp or jpeg at `quality` (1-100)."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.convert("RGB").save(buf, format=_PIL_FORMATS[fmt], quality=quality)
    return buf.getvalue()
