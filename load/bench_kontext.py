"""What a FLUX.1 Kontext edit costs against text-to-image on the same model: per batch
size, calls of text-to-image, of edits (each image a reference of the output's size) and
of edits reading one further reference of the same size.

    python -m load.bench_kontext                            # tiny Kontext, CPU
    python -m load.bench_kontext --random-flux load/flux-dev-configs.json \\
        --size 1024 --steps 28 --batches 1 2 --dtype bfloat16

With `--random-flux`, FLUX.1's architecture with random weights (the folder
`load.bench_engine` builds), served as Kontext from a folder of links to its modules
with Kontext's `model_index.json` (Kontext [dev] has the same modules). Per batch size
each case runs one untimed call, then the cases take turns for `--repeats` rounds of one
timed call each (so a machine's drift spreads over both). Prints and saves JSON (default
results/kontext-<device>-<size>.json): seconds per call, images/s, the edit's time over
text-to-image's, and the tokens each transformer step computes per image. Figures are
what this run saw.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from load.bench_models import add_call_args, case_turns, compared_rows
from load.bench_serving import machine
from load.report import save_report

CASES = ("txt2img", "edit", "edit+1")  # edit+1: one further reference
GUIDANCE = 2.5  # Replicate's flux-kontext-dev default


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--random-flux", metavar="CONFIGS", help=(
        "JSON of FLUX component configs (load/flux-dev-configs.json): a random full-size "
        "model served as Kontext"))
    add_call_args(p, size=256, steps=10)
    return p.parse_args(argv)


def kontext_folder(configs: str | None, cache_dir: Path) -> Path:
    """The embedded tiny Kontext, or the random FLUX's folder seen as Kontext: links to
    its modules beside a model_index.json naming FluxKontextPipeline."""
    from deployments.tiny import TINY_FLUX_KONTEXT, ensure_embedded
    from load.bench_models import model_folder

    if not configs:
        return ensure_embedded(TINY_FLUX_KONTEXT, cache_dir)
    flux = model_folder(configs, cache_dir, "flux")
    folder = flux.with_name(flux.name + "-kontext")
    if not (folder / "model_index.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for entry in flux.iterdir():
            if entry.name != "model_index.json" and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry.resolve())
        index = json.loads((flux / "model_index.json").read_text())
        index["_class_name"] = "FluxKontextPipeline"
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _requests(size: int, steps: int, images: int, case: str) -> list:
    import numpy as np

    from serve.types import GenerationRequest, Reference, SourceImage

    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    further = tuple(Reference(rng.integers(0, 256, (size, size, 3), dtype=np.uint8).tobytes(),
                              size, size) for _ in range(case.count("+")))
    source = (SourceImage(reference.tobytes(), 1.0, edit=True, references=further)
              if case != "txt2img" else None)
    base = GenerationRequest(model="bench/kontext", prompt="make the mug blue", width=size,
                             height=size, num_inference_steps=steps, guidance_scale=GUIDANCE,
                             seed=1, scheduler="FlowMatchEuler", source=source)
    return [replace(base, seed=1 + i) for i in range(images)]


def tokens_per_image(engine, request) -> int:
    """The image tokens one transformer step of `request` computes per image."""
    seen = []
    hook = engine.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]),
        with_kwargs=True)
    try:
        engine.generate([replace(request, num_inference_steps=1)])
    finally:
        hook.remove()
    return seen[0]


def main(argv: list[str] | None = None) -> dict:
    from deployments.engines import resolve_device
    from deployments.engines.flux import FluxKontextEngine
    from serve.config import default_cache_dir

    args = _parse_args(argv)
    engine = FluxKontextEngine(kontext_folder(args.random_flux, default_cache_dir()),
                               args.dtype, resolve_device("auto"))
    rows = []
    for images in args.batches:
        times = case_turns(dict.fromkeys(CASES, engine),
                           {case: _requests(args.size, args.steps, images, case)
                            for case in CASES}, args.repeats)
        rows += compared_rows(times, images, "txt2img")
    facts = engine.describe()
    tokens = {case: tokens_per_image(engine, _requests(args.size, 1, 1, case)[0])
              for case in CASES}
    report = {"benchmark": "kontext", "size": args.size, "steps": args.steps,
              "guidance_scale": GUIDANCE, "repeats": args.repeats,
              "device": facts["device"], "weights": facts["weights"],
              "model": "random-flux-kontext" if args.random_flux else "tiny-flux-kontext",
              "tokens_per_image": tokens, "machine": machine(), "rows": rows}
    print(json.dumps({"tokens_per_image": tokens}), flush=True)
    save_report(report, args.out, f"kontext-{facts['device'].split(':')[0]}-{args.size}")
    return report


if __name__ == "__main__":
    main()
