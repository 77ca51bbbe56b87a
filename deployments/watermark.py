"""Invisible watermarks: the mark that Stability AI's SDXL and Black Forest Labs' FLUX.1
reference code put in every image (the `invisible-watermark` library's `dwtDct`), with the
same messages, so the detectors people already run on such images find it in ours.

The mark lives in the image's U (blue-difference) channel as OpenCV computes it from 8-bit
BGR: in the Haar wavelet's approximation band, cut into 4x4 blocks, each block carries one
bit of the message (in turn) in the remainder, modulo `SCALE`, of its largest coefficient
after the first. A detector reads every block and takes each bit's majority.

This writes the same mark with numpy alone, a whole band at a time, and changes only what
the mark needs. The reference encoder also swaps the channel's horizontal and vertical
detail bands on the way back (a bug, and a visible one), rounds each coefficient down
rather than to the nearest place of its bit, and works in float with another U offset than
8-bit decoders use."""

from __future__ import annotations

import numpy as np
from PIL import Image

# The reference messages, turned into bits the way the reference code does (`bin(m)[2:]`,
# so FLUX.1's leading zeros are dropped and its mark is 46 bits long).
SDXL_MESSAGE = 0b101100111110110010010000011110111011000110011110
FLUX_MESSAGE = 0b001010101111111010000111100111001111010100101110
MESSAGES = {"sdxl": SDXL_MESSAGE, "flux": FLUX_MESSAGE}
SCALE = 36.0
BLOCK = 4
MIN_PIXELS = 256 * 256  # the reference refuses smaller images; they go out unmarked
# OpenCV's RGB -> YUV weights (BT.601 luma; U and V scaled as in analog PAL).
_Y = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_U_OF_B_MINUS_Y = 0.492111


def message_bits(message: int) -> np.ndarray:
    """The bits of `message`, from its highest set bit, as the reference code lists them."""
    return np.array([int(b) for b in bin(message)[2:]], dtype=np.int64)


def watermarked(image: Image.Image, bits: np.ndarray | None) -> Image.Image:
    """`image` (RGB) with `bits` marked in it. Without bits, and for images under 256x256
    pixels (which the reference leaves alone), the image as it is."""
    if bits is None or image.width * image.height < MIN_PIXELS:
        return image
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    rows, cols = rgb.shape[0] // BLOCK * BLOCK, rgb.shape[1] // BLOCK * BLOCK
    band = _approximation(_u_channel(rgb[:rows, :cols]))
    shift = _marked(band, bits) - band
    # With the detail bands unchanged, the inverse Haar step spreads an approximation
    # coefficient's change over its 2x2 pixels, each taking half. A change of U alone,
    # with Y and V kept, moves B, and G makes up B's share of Y.
    db = np.repeat(np.repeat(shift / (2 * _U_OF_B_MINUS_Y), 2, axis=0), 2, axis=1)
    out = rgb.copy()
    blue = out[:rows, :cols, 2]
    db = np.clip(np.rint(blue + db), 0, 255) - blue  # what the blue channel can take
    blue += db
    out[:rows, :cols, 1] -= db * _Y[2] / _Y[1]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def _u_channel(rgb: np.ndarray) -> np.ndarray:
    """U as OpenCV's 8-bit conversion gives it (offset 128), before its rounding."""
    return (rgb[..., 2] - rgb @ _Y) * _U_OF_B_MINUS_Y + 128.0


def _approximation(channel: np.ndarray) -> np.ndarray:
    """The one-level Haar approximation band (PyWavelets' `dwt2(..., 'haar')[0]`)."""
    return (channel[0::2, 0::2] + channel[0::2, 1::2]
            + channel[1::2, 0::2] + channel[1::2, 1::2]) / 2


def _marked(band: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """`band` with bit n % len(bits) set in its n-th 4x4 block (row by row): the block's
    largest coefficient after the first, in magnitude, moved to the nearest value a
    quarter (bit 0) or three quarters (bit 1) of the way through a `SCALE` step, its sign
    kept. (The reference rounds down, moving it by up to three quarters of a step: more
    change, more often below another coefficient, and less left after lossy encoding.)"""
    rows, cols = band.shape[0] // BLOCK, band.shape[1] // BLOCK
    used = band[:rows * BLOCK, :cols * BLOCK]
    blocks = used.reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3).reshape(-1, BLOCK ** 2)
    size = np.abs(blocks[:, 1:])
    n, at = np.arange(len(blocks)), size.argmax(axis=1)
    value = size[n, at]
    offset = (0.25 + 0.5 * bits[n % len(bits)]) * SCALE
    target = np.maximum(np.round((value - offset) / SCALE) * SCALE + offset, offset)
    blocks[n, at + 1] = np.copysign(target, blocks[n, at + 1])
    out = band.copy()
    out[:rows * BLOCK, :cols * BLOCK] = (
        blocks.reshape(rows, cols, BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(used.shape))
    return out
