"""What the benchmark programs share: the engine variants (dtype and speed settings) they
compare, the arguments that choose a model (the embedded tiny one, or a random full SDXL
or FLUX built once from component configs), the requests of a timed call, and how calls
are timed and their figures compared."""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

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


def sync() -> None:
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
    sync()
    started = time.perf_counter()
    fn(*args)
    sync()
    return time.perf_counter() - started
