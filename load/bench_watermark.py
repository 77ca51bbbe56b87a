"""What the invisible watermark costs and how much of it the output formats keep.

    python -m load.bench_watermark [--rounds 20] [--pictures 4]

For each size: the time to mark one image (median of `--rounds`), the change it makes
(PSNR against the unmarked image), and the bits the invisible-watermark library's decoder
gets wrong after each output format at Atelier's quality settings, summed over
`--pictures` synthetic pictures (smooth colour fields with fine grain; no model needed).
The library's own encoder is measured alongside, where it is installed with OpenCV (the
dev setup has both). Prints a table and saves JSON (default results/watermark-cpu.json).
Figures are what this run saw; nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time

import numpy as np
from PIL import Image

from deployments.watermark import SDXL_MESSAGE, message_bits, watermarked
from load.report import save_report

SIZES = ((1024, 1024), (1344, 768), (512, 512))
FORMATS = (("png", None), ("webp", 90), ("webp", 80), ("jpeg", 95), ("jpeg", 90),
           ("jpeg", 80))


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields with fine grain, nothing like the mark's pattern."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(height // 32, 2), max(width // 32, 2), 3), np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    grain = rng.integers(-4, 5, smooth.shape)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def _reference():
    """The library's encoder as a function of (image, bits), or None without it."""
    try:
        from imwatermark import WatermarkEncoder
    except ImportError:
        return None

    def mark(image: Image.Image, bits: np.ndarray) -> Image.Image:
        encoder = WatermarkEncoder()
        encoder.set_watermark("bits", [int(b) for b in bits])
        bgr = encoder.encode(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]), "dwtDct")
        return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
    return mark


def _wrong_bits(image: Image.Image, bits: np.ndarray, fmt: str, quality: int | None) -> int:
    from imwatermark import WatermarkDecoder

    buf = io.BytesIO()
    image.save(buf, format=fmt.upper(), **({} if quality is None else {"quality": quality}))
    bgr = np.asarray(Image.open(buf).convert("RGB"))[:, :, ::-1]
    read = WatermarkDecoder("bits", len(bits)).decode(np.ascontiguousarray(bgr), "dwtDct")
    return int((np.array(read, dtype=int) != bits).sum())


def psnr(a: Image.Image, b: Image.Image) -> float:
    err = np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2)
    return round(float(10 * np.log10(255 ** 2 / err)), 1)


def measure(mark, size: tuple[int, int], args: argparse.Namespace) -> dict:
    bits = message_bits(SDXL_MESSAGE)
    pictures = [picture(*size, seed=s) for s in range(args.pictures)]
    mark(pictures[0], bits)  # first-call allocations
    times = []
    for i in range(args.rounds):
        started = time.perf_counter()
        mark(pictures[i % len(pictures)], bits)
        times.append(time.perf_counter() - started)
    marked = [mark(p, bits) for p in pictures]
    return {"ms": round(statistics.median(times) * 1000, 1),
            "psnr_db": min(psnr(p, m) for p, m in zip(pictures, marked)),
            "wrong_bits": {f"{fmt}{q or ''}": sum(_wrong_bits(m, bits, fmt, q) for m in marked)
                           for fmt, q in FORMATS},
            "bits_read": len(bits) * len(marked)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--pictures", type=int, default=4)
    p.add_argument("--out")
    args = p.parse_args()
    encoders = {"atelier": watermarked, "invisible-watermark": _reference()}
    rows = []
    for size in SIZES:
        for name, mark in encoders.items():
            if mark is not None:
                rows.append({"encoder": name, "size": f"{size[0]}x{size[1]}",
                             **measure(mark, size, args)})
                r = rows[-1]
                print(f"{r['encoder']:>20} {r['size']:>9} {r['ms']:7.1f} ms "
                      f"{r['psnr_db']:5.1f} dB  wrong of {r['bits_read']}: {r['wrong_bits']}")
    save_report({"machine": {"platform": platform.platform(), "processor": platform.machine()},
                 "args": vars(args), "results": rows}, args.out, "watermark-cpu")


if __name__ == "__main__":
    main()
