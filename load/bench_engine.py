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
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from serve.config import SpeedConfig

_FAST = {"channels_last": True, "fuse_qkv": True}
_CALLS = itertools.count()
VARIANTS = {
    "fp16": ("float16", {}),
    "bf16": ("bfloat16", {}),
    "bf16-fast": ("bfloat16", _FAST),
    "fp8": ("bfloat16", {**_FAST, "fp8": True}),
    "compiled": ("bfloat16", {**_FAST, "compile": True}),
    "compiled-fp8": ("bfloat16", {**_FAST, "compile": True, "fp8": True}),
    "compiled-fp8-tensor": ("bfloat16", {**_FAST, "compile": True, "fp8": True,
                                         "fp8_scaling": "tensor"}),
    # Row-wise FP8 accumulated in float32 every 128 terms (fp8_fast_accum off).
    "compiled-fp8-slowaccum": ("bfloat16", {**_FAST, "compile": True, "fp8": True,
                                            "fp8_fast_accum": False}),
    # Inductor times its own kernels against the libraries' for each product and convolution.
    "compiled-autotune": ("bfloat16", {**_FAST, "compile": True,
                                       "compile_mode": "max-autotune-no-cudagraphs"}),
    "compiled-fp8-autotune": ("bfloat16", {**_FAST, "compile": True, "fp8": True,
                                           "compile_mode": "max-autotune-no-cudagraphs"}),
    # Static shapes: every call padded to 8 images, each block compiled for exactly that
    # shape (speed.batch_buckets), against the dynamic shapes of the plain compiled ones.
    "compiled-b8": ("bfloat16", {**_FAST, "compile": True, "batch_buckets": [8]}),
    "compiled-fp8-b8": ("bfloat16", {**_FAST, "compile": True, "fp8": True,
                                     "batch_buckets": [8]}),
    # FP8 with activation scales fixed by a start-up calibration (speed.fp8_activations).
    "compiled-fp8cal-b8": ("bfloat16", {**_FAST, "compile": True, "fp8": True,
                                        "fp8_activations": "calibrated",
                                        "batch_buckets": [8]}),
    # The same, with cuDNN timing its convolution algorithms (speed.cudnn_benchmark).
    "compiled-fp8cal-b8-cudnnbench": ("bfloat16", {**_FAST, "compile": True, "fp8": True,
                                                   "fp8_activations": "calibrated",
                                                   "batch_buckets": [8],
                                                   "cudnn_benchmark": True}),
    # serve/configs/sdxl-gpu-fast.yaml's settings: calls padded to 1, 2, 4 or 8 images.
    "compiled-fp8-buckets": ("bfloat16", {**_FAST, "compile": True, "fp8": True,
                                          "batch_buckets": [1, 2, 4, 8]}),
    "compiled-fp8cal-buckets": ("bfloat16", {**_FAST, "compile": True, "fp8": True,
                                             "fp8_activations": "calibrated",
                                             "batch_buckets": [1, 2, 4, 8]}),
    "compiled-cudnn": ("bfloat16", {**_FAST, "compile": True, "attention": "cudnn"}),
    "compiled-fp8-cudnn": ("bfloat16", {**_FAST, "compile": True, "fp8": True,
                                        "attention": "cudnn"}),
    # Guidance on the first half of the steps only: fewer UNet rows, different images.
    "fp16-cfg50": ("float16", {"cfg_cutoff": 0.5}),
    "compiled-cfg50": ("bfloat16", {**_FAST, "compile": True, "cfg_cutoff": 0.5}),
    "compiled-fp8-cfg50": ("bfloat16", {**_FAST, "compile": True, "fp8": True,
                                        "cfg_cutoff": 0.5}),
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The arguments that choose the model: a random full SDXL or FLUX, or a tiny one."""
    p.add_argument("--random-sdxl", help="build an SDXL with random weights from this JSON of "
                                         "component configs (default: the embedded tiny model)")
    p.add_argument("--random-flux", help="build a FLUX with random weights from this JSON of "
                                         "component configs (load/flux-dev-configs.json)")
    p.add_argument("--family", choices=("sdxl", "flux"),
                   help="the embedded tiny model of this family (default: sdxl, or flux with "
                        "--random-flux)")


def resolve_family(p: argparse.ArgumentParser, args: argparse.Namespace,
                   variants: list[str]) -> None:
    """Set args.family, args.configs (the random model's JSON, if any) and args.guidance
    (unless given) from the model arguments; refuse contradictions and variants the family
    cannot run (FLUX has no classifier-free guidance to cut off)."""
    family = "flux" if args.random_flux else args.family or "sdxl"
    if args.random_sdxl and args.random_flux or args.family not in (None, family):
        p.error("--random-sdxl, --random-flux and --family name different models")
    ruled_out = [v for v in variants if family == "flux" and "cfg_cutoff" in VARIANTS[v][1]]
    if ruled_out:
        p.error(f"FLUX has no classifier-free guidance to cut off: {', '.join(ruled_out)}")
    args.family, args.configs = family, args.random_sdxl or args.random_flux
    if getattr(args, "guidance", None) is None:  # the family's usual one
        args.guidance = GUIDANCE[family]


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


def model_folder(configs: str | None, cache_dir: Path, family: str = "sdxl") -> Path:
    """The folder to load: the family's tiny embedded model, or a random full model built
    once from the JSON of component configs `configs` into a folder named after that file
    (SDXL in fp16, FLUX in bf16, FLUX on the GPU when there is one)."""
    from deployments.tiny import build_random_sdxl, ensure_embedded
    from deployments.tiny_flux import build_random_flux
    from serve.model_parts import FAMILIES

    if not configs:
        return ensure_embedded(FAMILIES[family].embedded, cache_dir)
    spec = json.loads(Path(configs).read_text())
    folder = cache_dir / f"random-{Path(configs).stem.removesuffix('-configs')}"
    if not (folder / "model_index.json").exists():
        started = time.monotonic()
        if family == "flux":
            import torch

            build_random_flux(folder, spec, "bfloat16",
                              "cuda" if torch.cuda.is_available() else "cpu")
        else:
            build_random_sdxl(folder, spec, "float16")
        print(f"built random {family} in {time.monotonic() - started:.1f}s at {folder}",
              flush=True)
    return folder


# Guidance as the public pipelines are usually run: SDXL's classifier-free guidance at 8,
# FLUX.1-dev's distilled guidance at 3.5.
GUIDANCE = {"sdxl": 8.0, "flux": 3.5}


def call_requests(args: argparse.Namespace, images: int) -> list:
    from serve.model_parts import FAMILIES
    from serve.types import GenerationRequest

    family = args.family
    call = next(_CALLS)  # prompts new to every call: each is encoded, as in real traffic
    return [GenerationRequest(model="bench/x", prompt=f"benchmark image {call}-{i}",
                              seed=1000 + i, width=args.size, height=args.size,
                              guidance_scale=args.guidance,
                              num_inference_steps=args.steps,
                              scheduler=FAMILIES[family].schedulers[0])
            for i in range(images)]


def engine_class(family: str) -> type:
    """The family's engine (imported only when needed: it loads torch and diffusers)."""
    if family == "flux":
        from deployments.engines.flux import FluxEngine

        return FluxEngine
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def add_call_args(p: argparse.ArgumentParser, size: int, steps: int) -> None:
    """The arguments of the benchmarks that time one engine's calls per batch size: image
    size, steps, batch sizes, timed rounds, GPU dtype and the report's path."""
    p.add_argument("--size", type=int, default=size)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"],
                   help="on GPU (CPU computes in float32)")
    p.add_argument("--out", help="JSON output path")


def case_turns(engines: dict, cases: dict[str, list], repeats: int) -> dict[str, list[float]]:
    """Each case's call times on its engine (`engines` by case): one untimed call each
    (first-call allocation), then `repeats` rounds of one call each, so that a machine's
    drift spreads over every case."""
    for case, requests in cases.items():
        engines[case].generate(requests)
    times: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(repeats):
        for case, requests in cases.items():
            times[case].append(timed(engines[case].generate, requests))
    return times


def compared_rows(times: dict[str, list[float]], images: int, baseline: str,
                  extra: dict[str, dict] | None = None) -> list[dict]:
    """A row per case of calls of `images` images: median and fastest call, images/s,
    and the median over the `baseline` case's (`time_vs_<baseline>`), with the case's
    `extra` fields; each printed as JSON."""
    plain = statistics.median(times[baseline])
    rows = []
    for case, seconds in times.items():
        median = statistics.median(seconds)
        row = {"case": case, "batch": images, **(extra or {}).get(case, {}),
               "median_s": round(median, 4), "min_s": round(min(seconds), 4),
               "images_per_s": round(images / median, 3),
               f"time_vs_{baseline.replace(' ', '_')}": round(median / plain, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def timed(fn, *args) -> float:
    """Seconds `fn(*args)` takes, the GPU's queued work finished before and after."""
    _sync()
    started = time.perf_counter()
    fn(*args)
    _sync()
    return time.perf_counter() - started


def run_variant(args: argparse.Namespace) -> dict:
    """Child process: load, warm up, time each batch size; save the first batch's pixels."""
    import numpy as np
    import torch

    from deployments.engines import resolve_device

    dtype, speed = VARIANTS[args.one]
    started = time.monotonic()
    engine = engine_class(args.family)(Path(args.model), dtype, resolve_device("auto"),
                                       speed=SpeedConfig(**speed),
                                       compile_cache=Path(args.cache_dir) / "compile")
    load_s = time.monotonic() - started
    started = time.monotonic()
    warm = call_requests(args, 1)[0]
    engine.warm_up(replace(warm, prompt="warm-up", num_inference_steps=2), max(args.batches))
    _sync()
    out = {"variant": args.one, "dtype": dtype, "weights": engine.describe()["weights"],
           "speed": speed, "load_s": load_s,
           "warmup_s": time.monotonic() - started, "gc": gc_figures(), "batches": []}
    for size in args.batches:
        times = []
        for _ in range(args.repeats + 1):
            started = time.monotonic()
            images = engine.generate(call_requests(args, size))
            _sync()
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
        _sync()
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
