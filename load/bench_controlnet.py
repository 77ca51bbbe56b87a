"""What ControlNets cost: text-to-image with none, one and two, per batch size, on one
engine.

    python -m load.bench_controlnet                       # tiny SDXL, tiny ControlNet, CPU
    python -m load.bench_controlnet --random-sdxl ../shared/gpu/sdxl-base-configs.json \\
        --size 1024 --steps 20 --batches 1 8 --dtype bfloat16
    python -m load.bench_controlnet --flux                # tiny FLUX, tiny union ControlNet
    python -m load.bench_controlnet --random-flux load/flux-dev-configs.json \\
        --size 1024 --steps 28 --batches 1 2 --dtype bfloat16

With `--random-sdxl`, the SDXL base architecture with random weights (the folder
`load.bench_engine` builds) and a ControlNet of controlnet-canny-sdxl-1.0's design made
from that UNet (random weights too: the same FLOPs and memory as the real one), built
once into the cache; two ControlNets are that one loaded twice, as two real ones would
be. With `--random-flux`, FLUX.1's architecture with random weights and a union
ControlNet of InstantX's FLUX.1-dev-Controlnet-Union design (5 double- and 10
single-stream blocks, 10 modes), built once; two ControlNets are that union under two
names (modes 0 and 2), its weights loaded once, each run at every step, as a server
serving two of a union's modes does. Each count and batch size runs one untimed call,
then `--repeats` timed ones. Prints and saves JSON (default
results/controlnet[-flux]-<device>-<size>.json): seconds per call, images/s, the ratio to
no ControlNet, and the bytes each ControlNet's weights take. Figures are what this run
saw.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from load.bench_models import GUIDANCE, add_call_args, model_folder, timed
from load.bench_serving import machine
from load.report import save_report

# InstantX/FLUX.1-dev-Controlnet-Union's blocks and modes; the two modes the benchmark's
# two ControlNets serve (canny, depth).
INSTANTX_UNION = {"num_layers": 5, "num_single_layers": 10, "num_mode": 10}
_UNION_MODES = (0, 2)


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    family = p.add_mutually_exclusive_group()
    family.add_argument("--random-sdxl", metavar="CONFIGS", help=(
        "JSON of SDXL component configs: a random full-size model and ControlNet"))
    family.add_argument("--flux", action="store_true", help=(
        "the tiny FLUX and its tiny union ControlNet"))
    family.add_argument("--random-flux", metavar="CONFIGS", help=(
        "JSON of FLUX component configs: a random full-size FLUX and union ControlNet"))
    add_call_args(p, size=128, steps=10)
    p.add_argument("--counts", type=int, nargs="+", default=[0, 1, 2],
                   help="ControlNets per request")
    args = p.parse_args(argv)
    args.family = "flux" if args.flux or args.random_flux else "sdxl"
    return args


def flux_controlnet_folder(configs: str | None, cache_dir: Path) -> Path:
    """The embedded tiny union ControlNet, or a random one of InstantX's Union design for
    the transformer of `configs`, built once in bfloat16 (on the GPU when there is one)."""
    from deployments.tiny import TINY_FLUX_CONTROLNET, ensure_embedded

    if not configs:
        return ensure_embedded(TINY_FLUX_CONTROLNET, cache_dir)
    import torch

    from deployments.tiny_flux import build_random_flux_controlnet

    folder = model_folder(configs, cache_dir, "flux")
    folder = folder.with_name(folder.name + "-controlnet-union")
    if not (folder / "config.json").exists():
        transformer = json.loads(Path(configs).read_text())["transformer"]
        build_random_flux_controlnet(folder, transformer, INSTANTX_UNION, "bfloat16",
                                     "cuda" if torch.cuda.is_available() else "cpu")
    return folder


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


def _requests(size: int, steps: int, images: int, count: int, family: str) -> list:
    import numpy as np

    from serve.model_parts import FAMILIES
    from serve.types import ControlImage, GenerationRequest

    edges = np.zeros((size, size, 3), np.uint8)
    edges[size // 4:3 * size // 4, size // 4] = edges[size // 4, size // 4:3 * size // 4] = 255
    controls = tuple(ControlImage(f"net{i}", edges.tobytes(), 0.5) for i in range(count))
    base = GenerationRequest(model="bench/controlnet", prompt="product photo of a mug",
                             width=size, height=size, num_inference_steps=steps,
                             guidance_scale=GUIDANCE[family], seed=1,
                             scheduler=FAMILIES[family].schedulers[0],
                             controls=controls)
    return [replace(base, seed=1 + i) for i in range(images)]


def _timed(engine, requests: list, repeats: int) -> list[float]:
    engine.generate(requests)  # untimed: first-call allocation
    return [timed(engine.generate, requests) for _ in range(repeats)]


def _engine(args: argparse.Namespace, cache: Path):
    """The family's engine with `max(args.counts)` ControlNets named net0, net1, ..."""
    from deployments.engines import resolve_device
    from deployments.engines.controlnets import NetFiles

    count, device = max(args.counts), resolve_device("auto")
    if args.family == "flux":
        from deployments.engines.flux import FluxEngine

        net = flux_controlnet_folder(args.random_flux, cache)
        return FluxEngine(model_folder(args.random_flux, cache, "flux"), args.dtype, device,
                          controlnets={f"net{i}": NetFiles(net, None, _UNION_MODES[i % 2])
                                       for i in range(count)})
    from deployments.engines.sdxl import SDXLEngine

    model = model_folder(args.random_sdxl, cache)
    net = controlnet_folder(args.random_sdxl, model, cache)
    return SDXLEngine(model, args.dtype, device,
                      controlnets={f"net{i}": NetFiles(net) for i in range(count)})


def main(argv: list[str] | None = None) -> dict:
    from serve.config import default_cache_dir

    args = _parse_args(argv)
    engine = _engine(args, default_cache_dir())
    rows, plain = [], {}
    for images in args.batches:
        for count in args.counts:
            times = _timed(engine, _requests(args.size, args.steps, images, count,
                                             args.family), args.repeats)
            median = statistics.median(times)
            plain.setdefault(images, median if count == 0 else None)
            row = {"controlnets": count, "batch": images, "median_s": round(median, 4),
                   "min_s": round(min(times), 4), "images_per_s": round(images / median, 3)}
            if plain.get(images):
                row["time_vs_none"] = round(median / plain[images], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    first = next(iter(engine.controlnets.nets.values()), None)
    facts = engine.describe()
    random = args.random_flux or args.random_sdxl
    report = {"benchmark": "controlnet", "size": args.size, "steps": args.steps,
              "guidance_scale": GUIDANCE[args.family], "repeats": args.repeats,
              "device": facts["device"], "weights": facts["weights"],
              "model": f"{'random' if random else 'tiny'}-{args.family}",
              "controlnet_weight_bytes": first and sum(
                  p.numel() * p.element_size() for p in first.parameters()),
              "machine": machine(), "rows": rows}
    device = facts["device"].split(":")[0]
    kind = "controlnet-flux" if args.family == "flux" else "controlnet"
    save_report(report, args.out, f"{kind}-{device}-{args.size}")
    return report


if __name__ == "__main__":
    main()
