"""LoRA benchmark on one engine: switch time, load time, throughput lost to switching.

    python -m load.bench_adapters                                  # tiny model, CPU
    python -m load.bench_adapters --random-sdxl ../shared/gpu/sdxl-base-configs.json \\
        --rank 64 --size 1024 --steps 20                           # SDXL architecture, GPU
    python -m load.bench_adapters --random-flux load/flux-dev-configs.json \\
        --rank 32 --size 1024 --steps 28                           # FLUX.1-dev architecture

It builds random LoRA adapters of the given rank for the model's denoiser, on the family's
default targets (safetensors on local disk), loads them through the same code a replica
uses (LoRA slots, or merged into the weights with `--fuse`), optionally with the dtype and
speed settings of one of `load.bench_engine`'s variants (`--variant compiled-fp8`), and
measures loading, switching, throughput with switching, and requests with different
adapters in one call against one call each (`--mixed`; slots only). It prints and saves
JSON (default results/adapters-<device>[-fused][-<variant>].json). Figures are what this
run saw; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from load.bench_models import (
    GUIDANCE,
    VARIANTS,
    add_model_args,
    engine_class,
    model_folder,
    resolve_family,
    timed,
)
from load.report import save_report
from serve.config import SpeedConfig, default_cache_dir


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--adapters", type=int, default=5,
                   help="adapters to build (the replica gets one slot fewer)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--requests", type=int, default=20, help="requests per traffic mix")
    p.add_argument("--switch-every", type=int, default=5, help="1 in N requests switches")
    p.add_argument("--mixed", type=int, default=4,
                   help="requests with different adapters run in one call and one by one "
                        "(at most one fewer than --adapters)")
    p.add_argument("--fuse", action="store_true",
                   help="merge adapters into the weights (fuse_adapters) instead of slots")
    p.add_argument("--variant", choices=sorted(VARIANTS),
                   help="dtype and speed settings of load.bench_engine's variant of that name, "
                        "for the engine with adapters and the one without (default on a GPU: "
                        "fp16 for SDXL, bf16 for FLUX, no speed settings)")
    p.add_argument("--out", help="JSON output path")
    args = p.parse_args(argv)
    resolve_family(p, args, [args.variant] if args.variant else [])
    return args


def _prepare(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """The model folder, the adapter folder, and the dtype to serve in."""
    import torch

    from deployments.tiny import build_random_loras
    from deployments.tiny_flux import build_random_flux_loras

    cache = default_cache_dir()
    flux = args.family == "flux"
    dtype = VARIANTS[args.variant][0] if args.variant else "bfloat16" if flux else "float16"
    dtype = dtype if torch.cuda.is_available() else "float32"
    model = model_folder(args.configs, cache, args.family)
    folder = cache / f"bench-loras-{model.name}-r{args.rank}-n{args.adapters}-{dtype}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        specs = {f"bench-{i}": (args.rank, "peft") for i in range(args.adapters)}
        if flux:
            build_random_flux_loras(model / "transformer", folder, specs, dtype)
        else:
            build_random_loras(model / "unet", folder, specs, dtype)
    return model, folder, dtype


def _loads(engine, names: list[str]) -> dict:
    """Read (disk → staged CPU tensors, off the pipeline thread) and inject (→ a slot, on
    the pipeline thread) each adapter; with one slot fewer than adapters, the last loads
    evict the least recently used."""
    reads, injects = [], []
    for name in names:
        staged: list = []
        reads.append(timed(lambda n=name, out=staged: out.append(engine.adapters.read(n))))
        injects.append(timed(engine.adapters.inject, name, staged[0]))
    return {"read_ms": [r * 1000 for r in reads], "inject_ms": [i * 1000 for i in injects],
            "load_ms_median": statistics.median(r + i for r, i in zip(reads, injects, strict=True)) * 1000,
            "inject_ms_median": statistics.median(injects) * 1000}


def _switches(engine, names: list[str], rounds: int = 20) -> dict:
    from serve.adapters import AdapterSet

    a, b = AdapterSet.of([(names[0], 1.0)]), AdapterSet.of([(names[1], 0.8)])
    times = [timed(engine.adapters.activate, s) for _ in range(rounds) for s in (a, b)]
    base = [timed(engine.adapters.activate, s) for _ in range(rounds)
            for s in (AdapterSet(), a)]
    return {"held_switch_ms_median": statistics.median(times) * 1000,
            "held_switch_ms_max": max(times) * 1000,
            "base_toggle_ms_median": statistics.median(base) * 1000}


def _request(args, i: int, adapters):
    from serve.model_parts import FAMILIES
    from serve.types import GenerationRequest

    return GenerationRequest(
        model="bench", prompt=f"image {i}", width=args.size, height=args.size,
        num_inference_steps=args.steps, guidance_scale=GUIDANCE[args.family], seed=i,
        scheduler=FAMILIES[args.family].schedulers[0], adapters=adapters)


def _throughput(engine, args, names: list[str], switching: bool | None) -> float:
    """images/s: one adapter (False), switching 1 in N requests (True), or none (None)."""
    from serve.adapters import AdapterSet

    current = 0
    started = time.perf_counter()
    for i in range(args.requests):
        if switching and i % args.switch_every == args.switch_every - 1:
            current = 1 - current
        engine.generate([_request(args, i, AdapterSet() if switching is None
                                  else AdapterSet.of([(names[current], 1.0)]))])
    return args.requests / (time.perf_counter() - started)


def _mixed_calls(engine, args, names: list[str], rounds: int = 3) -> dict:
    """images/s for one request per adapter in `names` (each its own adapter): in one
    call, as LoRA slots run them, and in one call each, as a call per adapter set does."""
    from serve.adapters import AdapterSet

    requests = [_request(args, i, AdapterSet.of([(n, 1.0)])) for i, n in enumerate(names)]

    def one_each() -> None:
        for request in requests:
            engine.generate([request])

    shared = None
    if engine.adapters.mixes_sets:
        engine.generate(requests)  # warm-up at this batch size
        shared = len(requests) / statistics.median(
            timed(engine.generate, requests) for _ in range(rounds))
    separate = len(requests) / statistics.median(timed(one_each) for _ in range(rounds))
    return {"mixed_requests": len(requests), "images_per_s_mixed_one_call": shared,
            "images_per_s_mixed_call_each": separate}


def main() -> None:
    args = _parse_args()
    import torch

    from deployments.engines import compile_cache_dir
    from serve.adapters import AdapterCatalog

    model, folder, dtype = _prepare(args)
    catalog = AdapterCatalog.scan([(folder, args.family, 1.0)]).entries
    make_engine = engine_class(args.family)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    speed = SpeedConfig(**VARIANTS[args.variant][1] if args.variant else {})
    compile_cache = compile_cache_dir(default_cache_dir())
    engine = make_engine(model, dtype, device, adapters=catalog,
                         max_adapters=len(catalog) - 1, max_lora_rank=args.rank,
                         fuse_adapters=args.fuse, speed=speed, compile_cache=compile_cache)
    names = sorted(catalog)
    loads = _loads(engine, names)
    held = names[-2:]  # the two most recently loaded: still in their slots
    switches = _switches(engine, held)
    mixed_calls = _mixed_calls(engine, args, names[-min(args.mixed, len(names) - 1):])
    _throughput(engine, args, held, False)  # warm-up at this shape
    runs = {False: [], True: [], None: []}
    for _ in range(2):  # alternate, so drift in the machine's speed hits every mix
        for switching in (False, True, None):
            runs[switching].append(_throughput(engine, args, held, switching))
    steady, mixed = statistics.median(runs[False]), statistics.median(runs[True])
    base = statistics.median(runs[None])
    applied = engine.speed
    del engine
    # The same model without adapters
    plain = make_engine(model, dtype, device, speed=speed, compile_cache=compile_cache)
    _throughput(plain, args, held, None)
    no_slots = _throughput(plain, args, held, None)
    report = {"settings": vars(args), "device": torch.cuda.get_device_name(0)
              if device == "cuda" else platform.processor() or "cpu", "speed": applied,
              "adapter_mb": round(sum(Path(e.path).stat().st_size for e in catalog.values())
                                  / len(catalog) / 2**20, 1),
              **loads, **switches, **mixed_calls, "images_per_s_one_adapter": steady,
              "images_per_s_switching": mixed, "throughput_loss": 1 - mixed / steady,
              "images_per_s_no_adapter_slots_present": base,
              "images_per_s_without_slots": no_slots}
    print(json.dumps(report, indent=2))
    mode = ("-fused" if args.fuse else "") + (f"-{args.variant}" if args.variant else "")
    save_report(report, args.out, f"adapters-{'gpu' if device == 'cuda' else 'cpu'}{mode}")


if __name__ == "__main__":
    main()
