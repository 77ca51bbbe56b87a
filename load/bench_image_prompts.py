"""What image prompts (IP-Adapter) cost: per batch size, text-to-image on an engine without
the adapter, and on one with it with no image prompt, with half the images prompted and
with all of them; and what encoding one image prompt takes. With `--two-adapters` (SDXL),
also an engine holding a second, "plus" adapter beside the first (ip-adapter-plus_sdxl_
vit-h's design, 16 tokens, random weights, built once beside it), every image prompting
both. With `--boards`, also every image prompted by a mood board, of 4 pictures and 3 in
turn (a call of two or more images reads 12 pictures' tokens per row). With `--masks`
(SDXL), also every image's picture masked to the image's left half (diffusers' masked
attention).

    python -m load.bench_image_prompts                      # tiny SDXL and IP-Adapter, CPU
    python -m load.bench_image_prompts --family flux        # tiny FLUX, XLabs' layout
    python -m load.bench_image_prompts --random-sdxl ../shared/gpu/sdxl-base-configs.json \\
        --size 1024 --steps 20 --batches 1 8 --dtype bfloat16
    python -m load.bench_image_prompts --random-flux load/flux-dev-configs.json \\
        --size 1024 --steps 28 --batches 1 2 --dtype bfloat16

With `--random-sdxl`, the SDXL base architecture with random weights (the folder
`load.bench_engine` builds) and an IP-Adapter of ip-adapter_sdxl_vit-h's design made for
its UNet (random weights too: a ViT-H/14 image encoder, four image tokens), built once
into the cache. With `--random-flux`, FLUX.1's architecture and an adapter of
XLabs-AI/flux-ip-adapter's design (CLIP ViT-L/14, four tokens, every double-stream block),
random weights, built once. Per batch size each case runs one untimed call, then the cases
take turns for `--repeats` rounds of one timed call each (so a machine's drift spreads
over all of them); the encoding is timed alone, `--repeats` times after one untimed run.
Prints and saves JSON (default results/image-prompts-<device>-<size>.json,
flux-image-prompts-... for FLUX): seconds per call, images/s, the ratio to the engine
without the adapter, the encoding's seconds, and the bytes the image encoder and the
adapter's own layers take. Figures are what this run saw.
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
# XLabs-AI/flux-ip-adapter's image encoder: openai/clip-vit-large-patch14's vision tower.
VIT_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
         "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
         "projection_dim": 768, "hidden_act": "quick_gelu"}
CASES = ("no adapter", "none prompted", "half prompted", "all prompted")
TWO = "both adapters prompted"  # the case of --two-adapters
BOARDS = "boards of 4 and 3 prompted"  # the case of --boards
MASKED = "all prompted, masked"  # the case of --masks
PLUS_FILE = "ip-adapter-plus_sdxl.safetensors"  # the second adapter's file, beside the first


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=("sdxl", "flux"), default="sdxl", help=(
        "The model family (set by --random-sdxl or --random-flux)"))
    model = p.add_mutually_exclusive_group()
    model.add_argument("--random-sdxl", metavar="CONFIGS", help=(
        "JSON of SDXL component configs: a random full-size model and IP-Adapter"))
    model.add_argument("--random-flux", metavar="CONFIGS", help=(
        "JSON of FLUX component configs (load/flux-dev-configs.json): a random full-size "
        "model and XLabs-style IP-Adapter"))
    p.add_argument("--two-adapters", action="store_true", help=(
        "SDXL: also time an engine with a second (plus) adapter, both prompted"))
    p.add_argument("--boards", action="store_true", help=(
        "Also time every image prompted by a mood board of 4 or 3 pictures"))
    p.add_argument("--masks", action="store_true", help=(
        "SDXL: also time every image's picture masked to the left half"))
    add_call_args(p, size=128, steps=10)
    args = p.parse_args(argv)
    args.family = "flux" if args.random_flux else "sdxl" if args.random_sdxl else args.family
    args.configs = args.random_sdxl or args.random_flux
    if args.two_adapters and args.family != "sdxl":
        p.error("--two-adapters: SDXL models hold several IP-Adapters, FLUX ones one")
    if args.masks and args.family != "sdxl":
        p.error("--masks: masks are for SDXL models' IP-Adapters")
    return args


def adapter_folder(configs: str | None, model: Path, cache_dir: Path,
                   family: str = "sdxl") -> Path:
    """The family's embedded tiny IP-Adapter, or one made once for the random model: of
    ip-adapter_sdxl_vit-h's design for its UNet (fp16), or of XLabs' for its transformer
    (bf16)."""
    from deployments.tiny import TINY_FLUX_IP_ADAPTER, TINY_SDXL_IP_ADAPTER, ensure_embedded
    from deployments.tiny_ip_adapters import build_random_flux_ip_adapter, build_random_ip_adapter
    from serve.steering import IP_ADAPTER_LAYOUTS

    if not configs:
        tiny = TINY_FLUX_IP_ADAPTER if family == "flux" else TINY_SDXL_IP_ADAPTER
        return ensure_embedded(tiny, cache_dir)
    folder = cache_dir / f"random-ip-adapter-{Path(configs).stem.removesuffix('-configs')}"
    subfolder, weights, _ = IP_ADAPTER_LAYOUTS[family]
    if family == "flux" and not (folder / weights).exists():
        transformer = json.loads(Path(configs).read_text())["transformer"]
        build_random_flux_ip_adapter(folder, transformer, VIT_L, dtype="bfloat16")
    elif family == "sdxl" and not (folder / subfolder / weights).exists():
        import torch
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float16)
        build_random_ip_adapter(folder, unet, VIT_H, dtype="float16")
    return folder


def with_plus_adapter(folder: Path, model: Path, random: bool, cache_dir: Path) -> Path:
    """A folder with the first adapter's files (`folder`'s) and a second one (PLUS_FILE)
    beside it, made once for the model's UNet and read with the first's image encoder
    (ViT-H/14 for the random model). The embedded tiny adapter's folder stays as built:
    it is copied first."""
    import shutil

    from deployments.tiny_ip_adapters import TINY_IMAGE_ENCODER, build_random_plus_ip_adapter
    from serve.steering import IP_ADAPTER_LAYOUTS

    if not random:
        copy = cache_dir / "tiny-sdxl-ip-adapters-two"
        if not copy.exists():
            shutil.copytree(folder, copy)
        folder = copy
    file = folder / IP_ADAPTER_LAYOUTS["sdxl"][0] / PLUS_FILE
    if not file.exists():
        import torch
        from diffusers import UNet2DConditionModel

        dtype = "float16" if random else "float32"
        unet = UNet2DConditionModel.from_pretrained(model / "unet",
                                                    torch_dtype=getattr(torch, dtype))
        build_random_plus_ip_adapter(file, unet, VIT_H if random else TINY_IMAGE_ENCODER,
                                     dtype=dtype)
    return folder


def _requests(size: int, steps: int, images: int, prompted: int, family: str = "sdxl",
              case: str = "") -> list:
    import numpy as np

    from serve.types import GenerationRequest, ImagePrompt, Picture

    rng = np.random.default_rng(0)
    pictures = [Picture(rng.integers(0, 256, (size, size, 3), dtype=np.uint8).tobytes(),
                        size, size) for _ in range(4)]
    prompt = ImagePrompt(*pictures[0], 0.6)
    base = GenerationRequest(model="bench/image-prompts", prompt="product photo of a mug",
                             width=size, height=size, num_inference_steps=steps,
                             guidance_scale=GUIDANCE[family], seed=1,
                             scheduler="FlowMatchEuler" if family == "flux" else "K_EULER")
    extra = (("plus", prompt),) if case == TWO else ()
    requests = [replace(base, seed=1 + i, image_prompt=prompt if i < prompted else None,
                        extra_image_prompts=extra) for i in range(images)]
    if case == BOARDS:  # 4 pictures, 3, 4, ...
        return [replace(r, image_prompt=replace(prompt, more=tuple(pictures[1:4 - i % 2])))
                for i, r in enumerate(requests)]
    if case == MASKED:
        half = np.zeros((size, size), np.uint8)
        half[:, :size // 2] = 255
        masked = replace(prompt, mask=Picture(half.tobytes(), size, size))
        return [replace(r, image_prompt=masked) for r in requests]
    return requests


def _encoding_s(engine, size: int, repeats: int) -> float:
    """The median time to encode a picture not seen before (a held one skips its encoder),
    after one untimed encoding."""
    import numpy as np

    from serve.types import ImagePrompt

    rng = np.random.default_rng(1)
    pictures = [ImagePrompt(rng.integers(0, 256, (size, size, 3), dtype=np.uint8).tobytes(),
                            size, size, 0.6) for _ in range(repeats + 1)]
    engine.image_prompts.embed(pictures[0])  # untimed
    return statistics.median(timed(engine.image_prompts.embed, p) for p in pictures[1:])


def _bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def main(argv: list[str] | None = None) -> dict:
    from deployments.engines import resolve_device
    from deployments.engines.flux import FluxEngine
    from deployments.engines.sdxl import SDXLEngine
    from serve.config import default_cache_dir
    from serve.steering import IP_ADAPTER_LAYOUTS

    args = _parse_args(argv)
    cache, family = default_cache_dir(), args.family
    model = model_folder(args.configs, cache, family)
    files = (adapter_folder(args.configs, model, cache, family), *IP_ADAPTER_LAYOUTS[family])
    device = resolve_device("auto")
    engine = FluxEngine if family == "flux" else SDXLEngine
    engines = {"plain": engine(model, args.dtype, device),
               "adapter": engine(model, args.dtype, device, ip_adapter=files)}
    by_case = {case: engines["plain" if case == "no adapter" else "adapter"] for case in CASES}
    if args.two_adapters:
        both = with_plus_adapter(files[0], model, bool(args.configs), cache)
        by_case[TWO] = engine(model, args.dtype, device, ip_adapter=(
            both, files[1], (("", files[2]), ("plus", PLUS_FILE)), files[3]))
    for case, wanted in ((BOARDS, args.boards), (MASKED, args.masks)):
        if wanted:
            by_case[case] = engines["adapter"]
    rows = []
    for images in args.batches:
        counts = {"no adapter": 0, "none prompted": 0, "half prompted": images // 2,
                  "all prompted": images, TWO: images, BOARDS: images, MASKED: images}
        times = case_turns(by_case, {case: _requests(args.size, args.steps, images,
                                                     counts[case], family, case)
                                     for case in by_case}, args.repeats)
        rows += compared_rows(times, images, "no adapter",
                              {case: {"prompted": n} for case, n in counts.items()})
    adapter = engines["adapter"]
    facts = adapter.describe()
    report = {"benchmark": "image-prompts", "size": args.size, "steps": args.steps,
              "guidance_scale": GUIDANCE[family], "repeats": args.repeats,
              "device": facts["device"], "weights": facts["weights"],
              "model": f"{'random' if args.configs else 'tiny'}-{family}",
              "encoding_s": round(_encoding_s(adapter, args.size, args.repeats), 5),
              "image_encoder_bytes": _bytes([adapter.pipe.image_encoder]),
              "adapter_layers_bytes": _bytes([adapter.image_prompts.denoiser.encoder_hid_proj,
                                              *adapter.image_prompts.attention]),
              "machine": machine(), "rows": rows}
    print(json.dumps({k: report[k] for k in ("encoding_s", "image_encoder_bytes",
                                             "adapter_layers_bytes")}), flush=True)
    name = "image-prompts" if family == "sdxl" else "flux-image-prompts"
    save_report(report, args.out, f"{name}-{facts['device'].split(':')[0]}-{args.size}")
    return report


if __name__ == "__main__":
    main()
