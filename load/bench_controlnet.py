"""What ControlNets cost: text-to-image with none, one and two, per batch size, on one
engine.

    python -m load.bench_controlnet                       # tiny SDXL, tiny ControlNet, CPU
    python -m load.bench_controlnet --random-sdxl ../shared/gpu/sdxl-base-configs.json \\
        --size 1024 --steps 20 --batches 1 8 --dtype bfloat16

With `--random-sdxl`, the SDXL base architecture with random weights (the folder
`load.bench_engine` builds) and a ControlNet of controlnet-canny-sdxl-1.0's design made
from that UNet (random weights too: the same FLOPs and memory as the real one), built
once into the cache; two ControlNets are that one loaded twice, as two real ones would
be. Each count and batch size runs one untimed call, then `--repeats` timed ones. Prints
and saves JSON (default results/controlnet-<device>-<size>.json): seconds per call,
images/s, the ratio to no ControlNet, and the bytes each ControlNet's weights take.
Figures are what this run saw.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from load.bench_engine import GUIDANCE, add_call_args, model_folder, timed
from load.bench_serving import machine
from load.report import save_report


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--random-sdxl", metavar="CONFIGS", help=(
        "JSON of SDXL component configs: a random full-size model and ControlNet"))
    add_call_args(p, size=128, steps=10)
    p.add_argument("--counts", type=int, nargs="+", default=[0, 1, 2],
                   help="ControlNets per request")
    return p.parse_args(argv)


def controlnet_folder(configs: str | None, model: Path, cache_dir: Path) -> Path:
    """The embedded tiny ControlNet, or one made once from the random model's UNet with
    controlnet-canny-sdxl-1.0's conditioning embedding, saved in fp16."""
    from deployments.tiny import TINY_SDXL_CONTROLNET, ensure_embedded

    if not configs:
        return ensure_embedded(TINY_SDXL_CONTROLNET, cache_dir)
    folder = cache_dir / f"random-controlnet-{Path(configs).stem.removesuffix('-configs')}"
    if not (folder / "config.json").exists():
        import torch
        from diffusers import ControlNetModel, UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float16)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
        net.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def _requests(size: int, steps: int, images: int, count: int) -> list:
    import numpy as np

    from serve.types import ControlImage, GenerationRequest

    edges = np.zeros((size, size, 3), np.uint8)
    edges[size // 4:3 * size // 4, size // 4] = edges[size // 4, size // 4:3 * size // 4] = 255
    controls = tuple(ControlImage(f"net{i}", edges.tobytes(), 0.5) for i in range(count))
    base = GenerationRequest(model="bench/controlnet", prompt="product photo of a mug",
                             width=size, height=size, num_inference_steps=steps,
                             guidance_scale=GUIDANCE["sdxl"], seed=1, scheduler="K_EULER",
                             controls=controls)
    return [replace(base, seed=1 + i) for i in range(images)]


def _timed(engine, requests: list, repeats: int) -> list[float]:
    engine.generate(requests)  # untimed: first-call allocation
    return [timed(engine.generate, requests) for _ in range(repeats)]


def main(argv: list[str] | None = None) -> dict:
    from deployments.engines import resolve_device
    from deployments.engines.sdxl import SDXLEngine
    from serve.config import default_cache_dir

    args = _parse_args(argv)
    cache = default_cache_dir()
    model = model_folder(args.random_sdxl, cache)
    net = controlnet_folder(args.random_sdxl, model, cache)
    engine = SDXLEngine(model, args.dtype, resolve_device("auto"),
                        controlnets={f"net{i}": (net, None) for i in range(max(args.counts))})
    rows, plain = [], {}
    for images in args.batches:
        for count in args.counts:
            times = _timed(engine, _requests(args.size, args.steps, images, count),
                           args.repeats)
            median = statistics.median(times)
            plain.setdefault(images, median if count == 0 else None)
            row = {"controlnets": count, "batch": images, "median_s": round(median, 4),
                   "min_s": round(min(times), 4), "images_per_s": round(images / median, 3)}
            if plain.get(images):
                row["time_vs_none"] = round(median / plain[images], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    first = next(iter(engine.controlnets.values()), None)
    facts = engine.describe()
    report = {"benchmark": "controlnet", "size": args.size, "steps": args.steps,
              "guidance_scale": GUIDANCE["sdxl"], "repeats": args.repeats,
              "device": facts["device"], "weights": facts["weights"],
              "model": "random-sdxl" if args.random_sdxl else "tiny-sdxl",
              "controlnet_weight_bytes": first and sum(
                  p.numel() * p.element_size() for p in first.parameters()),
              "machine": machine(), "rows": rows}
    device = facts["device"].split(":")[0]
    save_report(report, args.out, f"controlnet-{device}-{args.size}")
    return report


if __name__ == "__main__":
    main()
