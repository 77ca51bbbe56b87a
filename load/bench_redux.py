"""What a FLUX.1 Redux image prompt costs: per batch size, calls of text-to-image on one
FLUX engine with Redux, without a picture, with one per request (its tokens appended to
the prompt's), and with one averaged down by 3 (`redux_downsampling`: a ninth of the
tokens), and the time Redux takes to encode one picture.

    python -m load.bench_redux                              # tiny FLUX and Redux, CPU
    python -m load.bench_redux --random-flux load/flux-dev-configs.json \\
        --size 1024 --steps 28 --batches 1 2 --dtype bfloat16

With `--random-flux`, FLUX.1's architecture with random weights (the folder
`load.bench_engine` builds) and a Redux of FLUX.1-Redux-dev's design with random weights
(SigLIP so400m at 384², 729 tokens, projected to 4096), built once. Per batch size each
case runs one untimed call, then the cases take turns for `--repeats` rounds of one timed
call each; the pictures' tokens are made before (in serving, beside the running call), and
their encoding is timed on its own, per picture. Prints and saves JSON (default
results/redux-<device>-<size>.json): seconds per call, images/s, the pictured call's time
over the plain one's, and the text tokens per image of each case. Figures are what this
run saw.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from load.bench_models import add_call_args, case_turns, compared_rows, model_folder, timed
from load.bench_serving import machine
from load.report import save_report

CASES = {"plain": None, "redux": 1, "redux-3": 3}  # case → downsampling (None: no picture)
# google/siglip-so400m-patch14-384's vision tower, which FLUX.1-Redux-dev ships.
SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                 "num_attention_heads": 16, "image_size": 384, "patch_size": 14}


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--random-flux", metavar="CONFIGS", help=(
        "JSON of FLUX component configs (load/flux-dev-configs.json): random full-size "
        "FLUX and Redux"))
    add_call_args(p, size=256, steps=10)
    return p.parse_args(argv)


def redux_folder(configs: str | None, cache_dir: Path) -> Path:
    """The embedded tiny Redux, or a random one of FLUX.1-Redux-dev's design for the
    transformer of `configs` (built once, on the GPU when there is one)."""
    from deployments.tiny import TINY_FLUX_REDUX, ensure_embedded

    if not configs:
        return ensure_embedded(TINY_FLUX_REDUX, cache_dir)
    import torch

    from deployments.tiny_flux import build_random_redux

    flux = model_folder(configs, cache_dir, "flux")
    folder = flux.with_name(flux.name + "-redux")
    if not (folder / "model_index.json").exists():
        width = json.loads(Path(configs).read_text())["transformer"]["joint_attention_dim"]
        build_random_redux(folder, SIGLIP_SO400M, width, "bfloat16",
                           "cuda" if torch.cuda.is_available() else "cpu")
    return folder


def _requests(size: int, steps: int, images: int, downsampling: int | None) -> list:
    """`images` requests (seeds 1, 2, ...), each with a picture of its own averaged down by
    `downsampling` (None: none)."""
    import numpy as np

    from serve.types import GenerationRequest, ImagePrompt

    base = GenerationRequest(model="bench/redux", prompt="a chair in a sunlit room",
                             width=size, height=size, num_inference_steps=steps,
                             guidance_scale=3.5, seed=1, scheduler="FlowMatchEuler")
    rng = np.random.default_rng(0)
    out = []
    for i in range(images):
        picture = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8).tobytes()
        prompt = downsampling and ImagePrompt(picture, 512, 512, 1.0, downsampling)
        out.append(replace(base, seed=1 + i, image_prompt=prompt))
    return out


def main(argv: list[str] | None = None) -> dict:
    from deployments.engines import resolve_device
    from deployments.engines.flux import FluxEngine
    from serve.config import default_cache_dir

    args = _parse_args(argv)
    cache, device = default_cache_dir(), resolve_device("auto")
    engine = FluxEngine(model_folder(args.random_flux, cache, "flux"), args.dtype, device,
                        redux=redux_folder(args.random_flux, cache))
    rows, tokens = [], {}
    for images in args.batches:
        cases = {case: _requests(args.size, args.steps, images, downsampling)
                 for case, downsampling in CASES.items()}
        tokens = {case: engine.prepare(requests[0])[0].embeds[0].shape[1]
                  for case, requests in cases.items()}  # and the pictures' tokens held
        times = case_turns(dict.fromkeys(CASES, engine), cases, args.repeats)
        rows += compared_rows(times, images, "plain")
    fresh = _requests(args.size, args.steps, args.repeats + 1, 1)
    encode = [timed(engine.redux.tokens, r.image_prompt.pictures[0])
              for r in fresh][1:]  # the first: warm
    facts = engine.describe()
    report = {"benchmark": "redux", "size": args.size, "steps": args.steps,
              "repeats": args.repeats, "device": facts["device"], "weights": facts["weights"],
              "model": "random-flux" if args.random_flux else "tiny-flux",
              "text_tokens_per_image": tokens,
              "encode_s_per_picture": round(statistics.median(encode), 4),
              "machine": machine(), "rows": rows}
    print(json.dumps({"text_tokens_per_image": tokens,
                      "encode_s_per_picture": report["encode_s_per_picture"]}), flush=True)
    save_report(report, args.out, f"redux-{facts['device'].split(':')[0]}-{args.size}")
    return report


if __name__ == "__main__":
    main()
