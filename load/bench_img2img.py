"""img2img, inpainting and streamed partial images against text-to-image, per family, on
one engine.

    python -m load.bench_img2img                        # tiny SDXL and tiny FLUX, CPU
    python -m load.bench_img2img --size 512 --steps 28 --repeats 9

Each mode runs the same prompt and seed `--repeats` times (after one untimed call) at
`--size`² and `--steps`; img2img runs only `steps x strength` denoising steps but also
encodes its input with the VAE; `txt2img+3 partial` is text-to-image taking the three
partial images a streamed OpenAI request asks for (three more VAE decodes). Prints and saves JSON (default
results/img2img-<device>-tiny<size>.json). Figures are what this run saw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

from deployments.engines.previews import preview_steps
from load.bench_serving import machine
from load.report import save_report

# (mode, strength, with a mask, partial images): the same for both families.
_MODES = [("txt2img", None, False, 0), ("img2img", 0.8, False, 0), ("img2img", 1.0, False, 0),
          ("inpaint", 0.8, True, 0), ("txt2img+3 partial", None, False, 3)]


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="JSON output path")
    return p.parse_args()


def _engine(family: str):
    from deployments.engines import create_engine
    from serve.config import ModelConfig, default_cache_dir

    model = ModelConfig(id=f"bench/{family}", family=family, embedded=f"tiny-{family}",
                        dtype="float16")
    return create_engine(model, default_cache_dir(), {})


def _requests(family: str, size: int, steps: int):
    import numpy as np

    from serve.config import FAMILIES
    from serve.types import GenerationRequest, SourceImage

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (size, size, 3), dtype=np.uint8).tobytes()
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    base = GenerationRequest(model=f"bench/{family}", prompt="product photo of a mug on a "
                             "marble counter", width=size, height=size, num_inference_steps=steps,
                             guidance_scale=3.5, seed=1,
                             scheduler=FAMILIES[family].schedulers[0])
    for mode, strength, masked, partial in _MODES:
        source = None if strength is None else SourceImage(
            photo, strength, mask.tobytes() if masked else None)
        name = mode if strength is None else f"{mode}@{strength}"
        yield name, replace(base, source=source, partial_images=partial)


def main() -> None:
    args = _parse_args()
    rows = []
    device = "cpu"
    for family in ("sdxl", "flux"):
        engine = _engine(family)
        device = engine.describe()["device"]
        for name, request in _requests(family, args.size, args.steps):
            partials: list[int] = []
            taken = partials.append  # the partial images' request indexes, one per image
            engine.generate([request], on_preview=lambda i, images, taken=taken: taken(i))
            times = []  # (the call above is untimed: first-call allocation)
            for _ in range(args.repeats):
                started = time.perf_counter()
                engine.generate([request], on_preview=lambda i, images, taken=taken: taken(i))
                times.append(time.perf_counter() - started)
            expected = len(preview_steps(request.partial_images, args.steps))
            assert len(partials) == expected * (args.repeats + 1)
            row = {"family": family, "mode": name,
                   "median_ms": round(statistics.median(times) * 1000, 1),
                   "min_ms": round(min(times) * 1000, 1)}
            rows.append(row)
            print(json.dumps(row))
    report = {"benchmark": "img2img", "size": args.size, "steps": args.steps,
              "repeats": args.repeats, "device": device, "machine": machine(), "rows": rows}
    save_report(report, args.out, f"img2img-{device.split(':')[0]}-tiny{args.size}")


if __name__ == "__main__":
    main()
