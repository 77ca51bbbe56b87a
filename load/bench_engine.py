"""Engine benchmark: what each speed setting buys, per batch size, without HTTP.

    python -m load.bench_engine                                   # embedded tiny model, CPU
    python -m load.bench_engine --random-sdxl ../shared/gpu/sdxl-base-configs.json \\
        --size 1024 --steps 20 --batches 8 16 --variants fp16 compiled compiled compiled-fp8
    python -m load.bench_engine --random-flux load/flux-dev-configs.json \\
        --size 1024 --steps 28 --batches 1 4 --variants bf16 compiled compiled-fp8

Each variant runs in a fresh process (its own memory and compile state): it loads the
model, runs the start-up warm-up (which compiles, for compiled variants), then for each
batch size one call more and `--repeats` timed calls. A variant named twice shows the
start with the compile cache its first run left. Images of the same seeds are compared
with the first variant (mean absolute difference in 8-bit levels). `--profile` adds where
one call's time goes by kind of kernel (`load.profile_ops`). Prints a table and writes
JSON (default results/engine-<device>.json) after each variant, marked `"partial": true`
until the last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from load.bench_models import (
    VARIANTS,
    add_model_args,
    call_requests,
    engine_class,
    model_folder,
    resolve_family,
    sync,
)
from serve.config import SpeedConfig


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                   default=["fp16", "bf16-fast", "fp8"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, help=(
        "guidance scale (default: 8 for SDXL, 3.5 for FLUX; SDXL at 1 or below runs "
        "unguided, one UNet row per image, as few-step models such as SDXL-Lightning do)"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--profile", action="store_true",
                   help="profile one call of the first batch size: time per kind of kernel")
    p.add_argument("--cache-dir", help="model and compile cache (default: Atelier's)")
    p.add_argument("--out", help="JSON output path")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: run this variant
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--pixels", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    resolve_family(p, args, args.variants)
    return args


def run_variant(args: argparse.Namespace) -> dict:
    """Child process: load, warm up, time each batch size; save the first batch's pixels."""
    import numpy as np
    import torch

    from deployments.engines import compile_cache_dir, resolve_device

    dtype, speed = VARIANTS[args.one]
    started = time.monotonic()
    engine = engine_class(args.family)(Path(args.model), dtype, resolve_device("auto"),
                                       speed=SpeedConfig(**speed),
                                       compile_cache=compile_cache_dir(Path(args.cache_dir)))
    load_s = time.monotonic() - started
    started = time.monotonic()
    warm = call_requests(args, 1)[0]
    engine.warm_up(replace(warm, prompt="warm-up", num_inference_steps=2), max(args.batches))
    sync()
    out = {"variant": args.one, "dtype": dtype, "weights": engine.describe()["weights"],
           "speed": speed, "load_s": load_s,
           "warmup_s": time.monotonic() - started, "gc": gc_figures(), "batches": []}
    for size in args.batches:
        times = []
        for _ in range(args.repeats + 1):
            started = time.monotonic()
            images = engine.generate(call_requests(args, size))
            sync()
            times.append(time.monotonic() - started)
        if size == args.batches[0]:
            np.save(args.pixels, np.stack([np.asarray(own[0]) for own in images]))
        best = sorted(times[1:])[len(times[1:]) // 2]
        out["batches"].append({"images": size, "first_call_s": times[0], "call_s": best,
                               "images_per_s": size / best})
    out["stages_s"] = _stages(engine, call_requests(args, args.batches[0]))
    if args.profile:
        from load.profile_ops import op_breakdown

        out["profile"] = op_breakdown(lambda: engine.generate(call_requests(args, args.batches[0])))
    if torch.cuda.is_available():
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def gc_figures() -> dict:
    """What a full garbage collection costs in this process after warm-up, before and
    after the heap is settled as a serving replica settles it (serve.gc_pauses); the
    calls timed after it run with the settled heap, as they would in a replica."""
    import gc

    from serve.gc_pauses import settle

    objects = len(gc.get_objects())
    started = time.perf_counter()
    gc.collect()
    full_s = time.perf_counter() - started
    settled = settle()
    started = time.perf_counter()
    gc.collect()
    return {"objects": objects, "full_collection_s": full_s, "frozen": settled["frozen"],
            "full_collection_settled_s": time.perf_counter() - started}


def _stages(engine, requests: list) -> dict:
    """Seconds of each stage of one call of `requests`, run piece by piece: prompt
    encoding, denoising (the denoiser's steps), VAE decode as the engine decodes, transfer
    to 8-bit PIL images."""
    import torch

    from deployments.engines.base import to_pil as _to_pil

    pipe, first, marks = engine.pipe, requests[0], [time.monotonic()]

    def mark() -> None:
        sync()
        marks.append(time.monotonic())

    with torch.inference_mode():
        embeds = engine._encode(requests, [engine.prepare(r)[0].embeds for r in requests])
        mark()
        latents = pipe(width=first.width, height=first.height, output_type="latent",
                       num_inference_steps=first.num_inference_steps,
                       guidance_scale=first.guidance_scale, **embeds).images
        mark()
        decoded = engine._decode_latents(pipe, latents, first.width, first.height)
        mark()
        _to_pil(decoded)
        mark()
    names = ("encode", "denoise", "vae_decode", "to_pil")
    return {name: b - a for name, a, b in zip(names, marks, marks[1:])}


def _child(args: argparse.Namespace, variant: str, folder: Path, pixels: Path) -> dict:
    cmd = [sys.executable, "-m", "load.bench_engine", "--one", variant, "--model", str(folder),
           "--family", args.family,
           "--pixels", str(pixels), "--cache-dir", args.cache_dir, "--size", str(args.size),
           "--steps", str(args.steps), "--guidance", str(args.guidance),
           "--repeats", str(args.repeats),
           "--batches", *map(str, args.batches), *(["--profile"] if args.profile else [])]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        return {"variant": variant, "error": done.stderr.strip().splitlines()[-1:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    if args.one:
        print(json.dumps(run_variant(args)))
        return {}
    import numpy as np

    from load.bench_serving import machine
    from load.flops import image_flops
    from load.report import save_report
    from serve.config import default_cache_dir

    args.cache_dir = args.cache_dir or str(default_cache_dir())
    folder = model_folder(args.configs, Path(args.cache_dir), args.family)
    guided = args.guidance > 1  # SDXL's pipelines guide above 1 only
    flops = image_flops(args.family, folder, args.size, args.steps, guided=guided)
    results, reference = [], None
    report = {"settings": {k: v for k, v in vars(args).items() if k not in
                           ("one", "model", "pixels")},
              "machine": machine(), "flops": flops, "variants": results}
    name = f"engine-{'gpu' if 'gpu' in report['machine'] else 'cpu'}"
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(args.variants):
            pixels = Path(tmp) / f"{i}.npy"
            r = _child(args, variant, folder, pixels)
            if "error" not in r:
                px = np.load(pixels).astype(np.int16)
                reference = px if reference is None else reference
                r["mean_abs_diff_vs_first"] = float(np.abs(px - reference).mean())
                own = image_flops(args.family, folder, args.size, args.steps,
                                  VARIANTS[variant][1].get("cfg_cutoff"), guided)["image"]
                r["flops_per_image"] = own
                for b in r["batches"]:
                    b["tflops"] = b["images_per_s"] * own / 1e12
            results.append(r)
            _print(r)
            save_report(report, args.out, name, partial=i + 1 < len(args.variants))
    return report


def _print(r: dict) -> None:
    if "error" in r:
        print(f"{r['variant']:<13} failed: {r['error']}", flush=True)
        return
    cells = "  ".join(f"b{b['images']}: {b['images_per_s']:.3f} img/s {b['tflops']:.0f} TFLOP/s"
                      f" (first {b['first_call_s']:.1f}s)" for b in r["batches"])
    stages = " ".join(f"{k} {v:.3f}s" for k, v in r["stages_s"].items())
    print(f"{r['variant']:<13} load {r['load_s']:.1f}s warm-up {r['warmup_s']:.1f}s  {cells}  "
          f"diff {r['mean_abs_diff_vs_first']:.2f}\n{'':<13} stages: {stages}", flush=True)
    full, settled = r["gc"]["full_collection_s"], r["gc"]["full_collection_settled_s"]
    print(f"{'':<13} full garbage collection of {r['gc']['objects']} objects "
          f"{full * 1000:.0f} ms, settled {settled * 1000:.1f} ms", flush=True)
    if "profile" in r:
        kinds = " ".join(f"{k} {v['share']:.0%}" for k, v in r["profile"]["kinds"].items())
        print(f"{'':<13} {r['profile']['measured']}: {kinds}", flush=True)


if __name__ == "__main__":
    main()
