"""What SDXL's per-request options cost against a plain text-to-image call, per batch size,
on one engine: long prompts of 100 and 200 words (read in up to three chunks of 75 tokens,
`prompts.chunks`; each row says how many), a call whose every other prompt is 200 words
and the rest plain (one call, the short prompts padded and masked), weighted words, tiling, and a hires pass at
1.5x, bicubic and through an ESRGAN x4 upscaler (Real-ESRGAN x4plus's network: 64
features, 23 blocks; random weights with `--random-sdxl`, else the embedded tiny one),
in tiles of 256 pixels (the config's default) and whole, and the finished images enlarged
2x through that upscaler without a redraw (`upscale`). With `--random-flux` or `--family
flux`, the same for FLUX's options: its hires passes and `upscale`.

    python -m load.bench_sdxl_options                     # tiny SDXL, CPU
    python -m load.bench_sdxl_options --random-sdxl ../shared/gpu/sdxl-base-configs.json \\
        --size 1024 --steps 20 --batches 1 8 --dtype bfloat16
    python -m load.bench_sdxl_options --random-flux load/flux-dev-configs.json \\
        --size 1024 --steps 28 --batches 1 4 --repeats 1

With `--random-sdxl` or `--random-flux`, the family's full architecture with random
weights (the folder `load.bench_engine` builds). The SDXL engine reads up to three chunks,
with weights. Each
option and batch size runs one untimed call, then `--repeats` timed ones; the hires rows'
images are 1.5x the size on a side, the upscale row's 2x (`output_size`: the side
answered). Prints and saves JSON (default
results/<family>-options-<device>-<size>.json): seconds per call, images/s and the ratio to
the plain call, and on a GPU the peak memory of each option's calls (GiB). Figures are
what this run saw.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from load.bench_models import (
    GUIDANCE,
    add_call_args,
    add_model_args,
    model_folder,
    resolve_family,
    timed,
)
from load.bench_serving import machine
from load.report import save_report

PROMPT = "product photo of a ceramic mug on a marble counter, soft window light"
# option → what it changes in the plain request (`prompt_words`: that many words).
OPTIONS = {
    "plain": {},
    "prompt of 100 words": {"prompt_words": 100},
    "prompt of 200 words": {"prompt_words": 200},
    # Every other image's prompt 200 words, the others plain: one call, padded and masked.
    "prompts of 1 and 3 chunks": {"prompt_words": 200, "every_other": True},
    "weighted words": {"prompt": "product photo of a (ceramic mug:1.3) on a [marble] "
                                 "counter, ((soft window light))"},
    "tiling": {"tiling": True},
    "hires 1.5x": {"hires_scale": 1.5, "hires_strength": 0.5, "hires_upscaler": "bicubic"},
    "hires 1.5x, ESRGAN x4": {"hires_scale": 1.5, "hires_strength": 0.5,
                              "hires_upscaler": "esrgan-x4"},
    "hires 1.5x, ESRGAN x4 untiled": {"hires_scale": 1.5, "hires_strength": 0.5,
                                      "hires_upscaler": "esrgan-x4-whole"},
    "upscale 2x, ESRGAN x4": {"upscale": 2, "upscaler": "esrgan-x4"},
}
# The options a FLUX model takes (its T5 reads long prompts whole; it draws no tiling).
FLUX_OPTIONS = ("plain", "hires 1.5x", "hires 1.5x, ESRGAN x4",
                "hires 1.5x, ESRGAN x4 untiled", "upscale 2x, ESRGAN x4")
_SCHEDULERS = {"sdxl": "K_EULER", "flux": "FlowMatchEuler"}


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    add_call_args(p, size=64, steps=4)
    p.add_argument("--options", nargs="+", choices=list(OPTIONS), help=(
        "default: every option the family takes"))
    args = p.parse_args(argv)
    resolve_family(p, args, [])
    family_options = list(OPTIONS) if args.family == "sdxl" else list(FLUX_OPTIONS)
    args.options = args.options or family_options
    if not set(args.options) <= set(family_options):
        p.error(f"{args.family} takes only these options: {', '.join(family_options)}")
    return args


def _requests(option: str, size: int, steps: int, images: int, family: str) -> list:
    from serve.types import GenerationRequest

    changes = dict(OPTIONS[option])
    words = changes.pop("prompt_words", 0)
    every_other = changes.pop("every_other", False)
    base = GenerationRequest(model=f"bench/{family}", prompt=PROMPT, width=size, height=size,
                             num_inference_steps=steps, guidance_scale=GUIDANCE[family],
                             seed=1, scheduler=_SCHEDULERS[family],
                             hires_multiple=16 if family == "flux" else 8)
    if words:  # the prompt's words, again and again (about one token each)
        changes["prompt"] = " ".join((PROMPT.replace(",", "").split() * words)[:words])
    mixed = replace(base, **changes)
    return [replace(base if every_other and i % 2 else mixed, seed=1 + i)
            for i in range(images)]


def _upscaler_file(full: bool, cache_dir: Path) -> Path:
    """The hires upscaler's file: Real-ESRGAN x4plus's network with random weights, saved
    as Real-ESRGAN saves it (built once), or the embedded tiny one."""
    from deployments.once import built_once
    from deployments.tiny import TINY_ESRGAN, TINY_ESRGAN_FILE, ensure_embedded

    if not full:
        return ensure_embedded(TINY_ESRGAN, cache_dir) / TINY_ESRGAN_FILE

    def build(folder: Path) -> None:
        import torch

        from deployments.engines.upscalers import RRDBNet

        torch.manual_seed(0)
        torch.save({"params_ema": RRDBNet().state_dict()}, folder / _RANDOM_ESRGAN)

    return built_once(cache_dir / "random-esrgan-x4plus", build) / _RANDOM_ESRGAN


_RANDOM_ESRGAN = "RealESRGAN_x4plus-random.pth"


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    """The most GPU memory torch held since `_reset_peak` (None without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _engine(args: argparse.Namespace, cache_dir: Path):
    """The family's engine, with Real-ESRGAN x4plus's network (or the tiny one) as an
    upscaler in the config's default tiles and as one that upscales whole images."""
    from deployments.engines import resolve_device
    from deployments.engines.upscalers import UpscalerFile
    from serve.model_extras import UpscalerConfig

    esrgan = _upscaler_file(bool(args.configs), cache_dir)
    tiles = UpscalerConfig(path=esrgan)
    upscalers = {"esrgan-x4": UpscalerFile(esrgan, tiles.tile, tiles.tile_pad),
                 "esrgan-x4-whole": UpscalerFile(esrgan)}
    folder, device = model_folder(args.configs, cache_dir, args.family), resolve_device("auto")
    if args.family == "flux":
        from deployments.engines.flux import FluxEngine

        return FluxEngine(folder, args.dtype, device, upscalers=upscalers)
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(folder, args.dtype, device, prompts={"chunks": 3, "weights": True},
                      upscalers=upscalers)


def main(argv: list[str] | None = None) -> dict:
    from serve.config import default_cache_dir

    args = _parse_args(argv)
    cache_dir = default_cache_dir()
    engine = _engine(args, cache_dir)
    rows, plain = [], {}
    for images in args.batches:
        for option in args.options:
            requests = _requests(option, args.size, args.steps, images, args.family)
            _reset_peak()
            engine.generate(requests)  # untimed: first-call allocation
            times = [timed(engine.generate, requests) for _ in range(args.repeats)]
            median = statistics.median(times)
            if option == "plain":
                plain[images] = median
            row = {"option": option, "batch": images,
                   "output_size": requests[0].delivered_size[0],
                   "median_s": round(median, 4), "min_s": round(min(times), 4),
                   "images_per_s": round(images / median, 3)}
            if args.family == "sdxl":  # the 75-token chunks its prompts are read in
                row["chunks"] = sorted({engine.long_prompts.count(r.prompt, r.negative_prompt)
                                        for r in requests})
            if images in plain:
                row["time_vs_plain"] = round(median / plain[images], 3)
            if (peak := _peak_gib()) is not None:
                row["peak_gib"] = peak
            rows.append(row)
            print(json.dumps(row), flush=True)
    facts = engine.describe()
    family = args.family
    report = {"benchmark": f"{family}-options", "size": args.size, "steps": args.steps,
              "guidance_scale": GUIDANCE[family], "repeats": args.repeats,
              "device": facts["device"], "weights": facts["weights"],
              "model": f"{'random' if args.configs else 'tiny'}-{family}",
              "machine": machine(), "rows": rows}
    save_report(report, args.out,
                f"{family}-options-{facts['device'].split(':')[0]}-{args.size}")
    return report


if __name__ == "__main__":
    main()
