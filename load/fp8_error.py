"""FP8 against bfloat16, layer by layer: the error each layer that `speed.fp8` computes in
FP8 adds, on the activations a real call feeds it.

    python -m load.fp8_error                                     # embedded tiny model, CPU
    python -m load.fp8_error --random-sdxl ../shared/gpu/sdxl-base-configs.json \\
        --size 1024 --steps 20 --out results/fp8-error-h100.json
    python -m load.fp8_error --model /models/sdxl-base --size 1024 --steps 30
    python -m load.fp8_error --random-flux load/flux-dev-configs.json --size 1024 --steps 28

Images say little about FP8 on random weights: those amplify every rounding along the
denoising trajectory, so bfloat16 alone moves the images as far as FP8 does. This runs one
call of the model as it is served without FP8 (bfloat16 on a GPU, float32 on a CPU; fused
QKV, as the served FP8 setting has it) and, at every layer FP8 would replace, computes the
output again from the same input: in float32 (the reference), in bfloat16, and in FP8 with
each setting (row-wise scales with and without fast accumulation, one scale per tensor,
and row-wise weights with activation scales fixed beforehand by a calibration call of
other prompts, as `fp8_activations: calibrated` fixes them at start-up). The call itself
goes on unchanged. A layer's error is ‖y − y_ref‖ / ‖y_ref‖ over all its
calls. The report gives, for bfloat16 and each FP8 setting, the mean, median and largest
over layers, the worst layers, and the median of FP8's error in units of bfloat16's own.
Random weights lack the outlying values of trained ones, which per-tensor scales suffer
from most: `--model` measures a real SDXL folder, or FLUX with `--family flux` (diffusers
format). Prints a table; writes JSON
(default results/fp8-error-<device>.json).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from deployments.engines.speed import (
    Fp8Linear,
    calibrate_fp8,
    calibration_calls,
    fp8_candidates,
)
from load.bench_models import add_model_args, resolve_family

# name: (row-wise scales, fast accumulation), as speed.fp8_scaling / speed.fp8_fast_accum.
FP8_SETTINGS = {"fp8-row": (True, True), "fp8-row-slowaccum": (True, False),
                "fp8-tensor": (False, True)}
CALIBRATED = "fp8-row-calibrated"  # speed.fp8_activations: calibrated
COMPUTED = ("bf16", *FP8_SETTINGS, CALIBRATED)


class LayerError:
    """A forward hook on one linear layer: adds the squared error against float32 of the
    layer computed in bfloat16 and in each FP8 setting, and the squared reference, over
    every call. It returns nothing, so the layer's own output goes on unchanged."""

    def __init__(self, linear: nn.Linear):
        self.fp8 = {per_row: Fp8Linear(linear, per_row) for per_row in (True, False)}
        self.calibrated = Fp8Linear(linear)
        self.squared = dict.fromkeys(COMPUTED, 0.0)
        self.reference = 0.0

    def __call__(self, module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]
        if self.calibrated.observed is not None:  # the calibration call: observe only
            self.calibrated(x)
            return
        ref = _linear(module, x, torch.float32)
        self.reference += ref.square().sum().item()
        self._add("bf16", _linear(module, x, torch.bfloat16), ref)
        for name, (per_row, fast_accum) in FP8_SETTINGS.items():
            layer = self.fp8[per_row]
            layer.fast_accum = fast_accum
            self._add(name, layer(x), ref)
        self._add(CALIBRATED, self.calibrated(x), ref)

    def _add(self, name: str, y: torch.Tensor, ref: torch.Tensor) -> None:
        self.squared[name] += (y.float() - ref).square().sum().item()

    def relative(self) -> dict[str, float]:
        return {name: math.sqrt(sq / self.reference) if self.reference else 0.0
                for name, sq in self.squared.items()}


def _linear(module: nn.Linear, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The layer computed in `dtype`, weights and input rounded to it."""
    bias = None if module.bias is None else module.bias.to(dtype)
    return F.linear(x.to(dtype), module.weight.to(dtype), bias)


def measure(engine, requests: list, worst: int = 5) -> tuple[dict, list]:
    """Run `requests` as one call of `engine` (as served without FP8: bfloat16 on a GPU,
    float32 on a CPU) with a LayerError on every FP8 candidate of its denoiser; return the
    summary and the call's images."""
    denoiser = getattr(engine.pipe, engine.denoiser)
    names = {id(m): name for name, m in denoiser.named_modules()}
    hooks, handles = {}, []
    for _, _, linear in fp8_candidates(denoiser):
        hooks[names[id(linear)]] = hook = LayerError(linear)
        handles.append(linear.register_forward_hook(hook))
    calibrated = nn.ModuleList(hook.calibrated for hook in hooks.values())
    try:
        calibrate_fp8(calibrated, lambda: engine.generate(calibration_calls(requests[0])))
        images = engine.generate(requests)
    finally:
        for handle in handles:
            handle.remove()
    errors = {name: hook.relative() for name, hook in hooks.items()}
    return summarize(errors, worst), images


def summarize(errors: dict[str, dict[str, float]], worst: int = 5) -> dict:
    """Per computation: mean, median and largest error over layers and the `worst` layers;
    per FP8 setting, the median over layers of its error divided by bfloat16's."""
    out: dict = {"layers": len(errors), "by_layer": errors, "summary": {}}
    for name in COMPUTED:
        values = sorted(((e[name], layer) for layer, e in errors.items()), reverse=True)
        row = {"mean": statistics.fmean(v for v, _ in values),
               "median": statistics.median(v for v, _ in values), "max": values[0][0],
               "worst": [{"layer": layer, "error": v} for v, layer in values[:worst]]}
        if name != "bf16":
            row["median_vs_bf16"] = statistics.median(
                e[name] / e["bf16"] for e in errors.values() if e["bf16"] > 0)
        out["summary"][name] = row
    return out


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--model", help="a model folder in diffusers format instead")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--images", type=int, default=1, help="images in the measured call")
    p.add_argument("--cache-dir", help="model cache (default: Atelier's)")
    p.add_argument("--out", help="JSON output path")
    args = p.parse_args(argv)
    resolve_family(p, args, [])
    return args


def main(argv: list[str] | None = None) -> dict:
    from deployments.engines import resolve_device
    from load.bench_models import call_requests, engine_class, model_folder
    from load.bench_serving import machine
    from load.report import save_report
    from serve.config import SpeedConfig, default_cache_dir

    args = _parse_args(argv)
    args.cache_dir = args.cache_dir or str(default_cache_dir())
    folder = Path(args.model) if args.model else model_folder(
        args.configs, Path(args.cache_dir), args.family)
    engine = engine_class(args.family)(folder, "bfloat16", resolve_device("auto"),
                                       speed=SpeedConfig(fuse_qkv=True))
    started = time.monotonic()
    with torch.inference_mode():
        measured, _ = measure(engine, call_requests(args, args.images))
    report = {"settings": vars(args), "machine": machine(), "call_dtype": str(engine.dtype),
              "call_s": time.monotonic() - started, **measured}
    _print(report)
    save_report(report, args.out, f"fp8-error-{'gpu' if 'gpu' in report['machine'] else 'cpu'}")
    return report


def _print(report: dict) -> None:
    print(f"{report['layers']} layers, relative error against float32 "
          "(mean / median / max over layers; median in units of bfloat16's):")
    for name, row in report["summary"].items():
        units = f"  x{row['median_vs_bf16']:.1f}" if "median_vs_bf16" in row else ""
        print(f"  {name:<18} {row['mean']:.4f} / {row['median']:.4f} / {row['max']:.4f}"
              f"{units}  worst: {row['worst'][0]['layer']}", flush=True)


if __name__ == "__main__":
    main()
