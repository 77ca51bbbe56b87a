"""What image prompts (IP-Adapter) cost: per batch size, text-to-image on an engine without
the adapter, and on one with it with no image prompt, with half the images prompted and
with all of them; and what encoding one image prompt takes.

    python -m load.bench_image_prompts                      # tiny SDXL and IP-Adapter, CPU
    python -m load.bench_image_prompts --random-sdxl ../shared/gpu/sdxl-base-configs.json \\
        --size 1024 --steps 20 --batches 1 8 --dtype bfloat16

With `--random-sdxl`, the SDXL base architecture with random weights (the folder
`load.bench_engine` builds) and an IP-Adapter of ip-adapter_sdxl_vit-h's design made for
its UNet (random weights too: a ViT-H/14 image encoder, four image tokens), built once
into the cache. Per batch size each case runs one untimed call, then the cases take turns
for `--repeats` rounds of one timed call each (so a machine's drift spreads over all of
them); the encoding is timed alone, `--repeats` times after one untimed run. Prints and saves JSON (default
results/image-prompts-<device>-<size>.json): seconds per call, images/s, the ratio to
the engine without the adapter, the encoding's seconds, and the bytes the image encoder
and the adapter's own layers take. Figures are what this run saw.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from load.bench_engine import (
    GUIDANCE,
    add_call_args,
    case_turns,
    compared_rows,
    model_folder,
    timed,
)
from load.bench_serving import machine
from load.report import save_report

# ip-adapter_sdxl_vit-h's image encoder: OpenCLIP ViT-H/14 as CLIPVisionModelWithProjection.
VIT_H = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
         "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
         "projection_dim": 1024, "hidden_act": "gelu"}
FILES = ("sdxl_models", "ip-adapter_sdxl.safetensors", "image_encoder")
CASES = ("no adapter", "none prompted", "half prompted", "all prompted")


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--random-sdxl", metavar="CONFIGS", help=(
        "JSON of SDXL component configs: a random full-size model and IP-Adapter"))
    add_call_args(p, size=128, steps=10)
    return p.parse_args(argv)


def adapter_folder(configs: str | None, model: Path, cache_dir: Path) -> Path:
    """The embedded tiny IP-Adapter, or one made once for the random model's UNet with
    ip-adapter_sdxl_vit-h's design, saved in fp16."""
    from deployments.tiny import TINY_SDXL_IP_ADAPTER, ensure_embedded
    from deployments.tiny_ip_adapters import build_random_ip_adapter

    if not configs:
        return ensure_embedded(TINY_SDXL_IP_ADAPTER, cache_dir)
    folder = cache_dir / f"random-ip-adapter-{Path(configs).stem.removesuffix('-configs')}"
    if not (folder / FILES[0] / FILES[1]).exists():
        import torch
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float16)
        build_random_ip_adapter(folder, unet, VIT_H, dtype="float16")
    return folder


def _requests(size: int, steps: int, images: int, prompted: int) -> list:
    import numpy as np

    from serve.types import GenerationRequest, ImagePrompt

    picture = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    prompt = ImagePrompt(picture.tobytes(), size, size, 0.6)
    base = GenerationRequest(model="bench/image-prompts", prompt="product photo of a mug",
                             width=size, height=size, num_inference_steps=steps,
                             guidance_scale=GUIDANCE["sdxl"], seed=1, scheduler="K_EULER")
    return [replace(base, seed=1 + i, image_prompt=prompt if i < prompted else None)
            for i in range(images)]


def _encoding_s(engine, request, repeats: int) -> float:
    engine.image_prompts.embed(request.image_prompt)  # untimed
    return statistics.median(timed(engine.image_prompts.embed, request.image_prompt)
                             for _ in range(repeats))


def _bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def main(argv: list[str] | None = None) -> dict:
    from deployments.engines import resolve_device
    from deployments.engines.sdxl import SDXLEngine
    from serve.config import default_cache_dir

    args = _parse_args(argv)
    cache = default_cache_dir()
    model = model_folder(args.random_sdxl, cache)
    folder = adapter_folder(args.random_sdxl, model, cache)
    device = resolve_device("auto")
    engines = {"plain": SDXLEngine(model, args.dtype, device),
               "adapter": SDXLEngine(model, args.dtype, device, ip_adapter=(folder, *FILES))}
    rows = []
    by_case = {case: engines["plain" if case == "no adapter" else "adapter"] for case in CASES}
    for images in args.batches:
        counts = {"no adapter": 0, "none prompted": 0, "half prompted": images // 2,
                  "all prompted": images}
        times = case_turns(by_case, {case: _requests(args.size, args.steps, images,
                                                     counts[case]) for case in CASES},
                           args.repeats)
        rows += compared_rows(times, images, "no adapter",
                              {case: {"prompted": n} for case, n in counts.items()})
    adapter = engines["adapter"]
    request = _requests(args.size, args.steps, 1, 1)[0]
    facts = adapter.describe()
    report = {"benchmark": "image-prompts", "size": args.size, "steps": args.steps,
              "guidance_scale": GUIDANCE["sdxl"], "repeats": args.repeats,
              "device": facts["device"], "weights": facts["weights"],
              "model": "random-sdxl" if args.random_sdxl else "tiny-sdxl",
              "encoding_s": round(_encoding_s(adapter, request, args.repeats), 5),
              "image_encoder_bytes": _bytes([adapter.pipe.image_encoder]),
              "adapter_layers_bytes": _bytes([adapter.pipe.unet.encoder_hid_proj,
                                              *adapter.image_prompts.attention]),
              "machine": machine(), "rows": rows}
    print(json.dumps({k: report[k] for k in ("encoding_s", "image_encoder_bytes",
                                             "adapter_layers_bytes")}), flush=True)
    save_report(report, args.out, f"image-prompts-{facts['device'].split(':')[0]}-{args.size}")
    return report


if __name__ == "__main__":
    main()
