"""What a FLUX.1 Fill fill costs against FLUX.1's own inpainting: per batch size, calls of
the same masked image (its middle half to draw) through a plain FLUX model's inpainting
pipeline at strength 1 and through a Fill model.

    python -m load.bench_fill                               # tiny FLUX and Fill, CPU
    python -m load.bench_fill --random-flux load/flux-dev-configs.json \\
        --size 1024 --steps 28 --batches 1 2 --dtype bfloat16

With `--random-flux`, FLUX.1's architecture with random weights (the folder
`load.bench_engine` builds), and a Fill model beside it: a random transformer of the same
configs with the wider input, and links to the FLUX folder's text encoders, VAE,
tokenizers and scheduler (two full folders would not fit a 64 GB disk). Per batch size
each case runs one untimed call, then the cases take turns for `--repeats` rounds of one
timed call each. Prints and saves JSON (default results/fill-<device>-<size>.json):
seconds per call, images/s, the fill's time over inpainting's, and each transformer's
input channels per token. Figures are what this run saw.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from load.bench_models import add_call_args, case_turns, compared_rows, model_folder
from load.bench_serving import machine
from load.report import save_report

CASES = ("inpaint", "fill")
GUIDANCE = 30.0  # Replicate's flux-fill-dev default (FLUX.1 [dev]'s inpainting reads it too)


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--random-flux", metavar="CONFIGS", help=(
        "JSON of FLUX component configs (load/flux-dev-configs.json): random full-size "
        "FLUX and Fill models"))
    add_call_args(p, size=256, steps=10)
    return p.parse_args(argv)


def fill_folder(configs: str | None, cache_dir: Path) -> Path:
    """The embedded tiny Fill, or a random Fill transformer (built once, on the GPU when
    there is one) beside links to the random FLUX's other modules."""
    from deployments.tiny import TINY_FLUX_FILL, ensure_embedded

    if not configs:
        return ensure_embedded(TINY_FLUX_FILL, cache_dir)
    flux = model_folder(configs, cache_dir, "flux")
    folder = flux.with_name(flux.name + "-fill")
    if not (folder / "model_index.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for entry in flux.iterdir():
            linked = folder / entry.name
            if entry.name not in ("model_index.json", "transformer") and not linked.exists():
                linked.symlink_to(entry.resolve())
        _random_fill_transformer(json.loads(Path(configs).read_text()), folder / "transformer")
        index = json.loads((flux / "model_index.json").read_text())
        index["_class_name"] = "FluxFillPipeline"
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _random_fill_transformer(configs: dict, folder: Path) -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    from deployments.tiny_flux import transformer_config

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        transformer = FluxTransformer2DModel(**transformer_config(configs, "fill"))
    transformer.to(device="cpu", dtype=torch.bfloat16).save_pretrained(folder)


def _requests(size: int, steps: int, images: int) -> list:
    """`images` requests (seeds 1, 2, ...) of one photo whose middle half is masked."""
    import numpy as np

    from serve.types import GenerationRequest, SourceImage

    photo = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4:size * 3 // 4, size // 4:size * 3 // 4] = 255
    base = GenerationRequest(model="bench/fill", prompt="a blue ceramic vase", width=size,
                             height=size, num_inference_steps=steps, guidance_scale=GUIDANCE,
                             seed=1, scheduler="FlowMatchEuler",
                             source=SourceImage(photo.tobytes(), 1.0, mask.tobytes()))
    return [replace(base, seed=1 + i) for i in range(images)]


def main(argv: list[str] | None = None) -> dict:
    from deployments.engines import resolve_device
    from deployments.engines.flux import FluxEngine, FluxFillEngine
    from serve.config import default_cache_dir

    args = _parse_args(argv)
    cache, device = default_cache_dir(), resolve_device("auto")
    engines = {"inpaint": FluxEngine(model_folder(args.random_flux, cache, "flux"),
                                     args.dtype, device),
               "fill": FluxFillEngine(fill_folder(args.random_flux, cache), args.dtype, device)}
    rows = []
    for images in args.batches:
        requests = _requests(args.size, args.steps, images)
        times = case_turns(engines, dict.fromkeys(CASES, requests), args.repeats)
        rows += compared_rows(times, images, "inpaint")
    facts = engines["fill"].describe()
    channels = {case: engine.pipe.transformer.config.in_channels
                for case, engine in engines.items()}
    report = {"benchmark": "fill", "size": args.size, "steps": args.steps,
              "guidance_scale": GUIDANCE, "repeats": args.repeats, "strength": 1.0,
              "device": facts["device"], "weights": facts["weights"],
              "model": "random-flux" if args.random_flux else "tiny-flux",
              "input_channels_per_token": channels, "machine": machine(), "rows": rows}
    print(json.dumps({"input_channels_per_token": channels}), flush=True)
    save_report(report, args.out, f"fill-{facts['device'].split(':')[0]}-{args.size}")
    return report


if __name__ == "__main__":
    main()
