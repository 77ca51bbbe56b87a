"""Loading a family's pipelines from local files: the first from its folder, the others
(img2img, inpainting) over the same modules; single-file checkpoints converted once
into a folder."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

log = logging.getLogger("ray.serve.atelier.engine")


def load_pipeline(cls: type, path: Path, dtype: torch.dtype, variant: str | None,
                  **components):
    """Load from a diffusers folder; never reach the network. `components` are modules
    given instead of the folder's own (which are then not loaded)."""
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"model path {path} must be a diffusers folder")
    log.info("loading %s from %s (%s)", cls.__name__, path, dtype)
    return cls.from_pretrained(path, dtype=dtype, variant=variant, local_files_only=True,
                               use_safetensors=True, **components)


def quiet(pipe):
    """`pipe` as the engine calls it: without its progress bar, and without the invisible
    watermark diffusers' SDXL pipelines put on their images themselves where the
    invisible-watermark library is installed (`add_watermarker` unset). That mark went on
    every image 256 or more pixels wide whatever the request asked, and failed the call of
    a wide image of fewer than 256x256 pixels (512x64); the images are marked once they
    are made, as the model's config and the request say (deployments.watermark)."""
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "watermark", None) is not None:
        pipe.watermark = None
    return pipe


def load_vae(folder: Path, dtype: torch.dtype):
    """A diffusers AutoencoderKL folder (a model's `vae`), from local files only."""
    from diffusers import AutoencoderKL

    log.info("loading the VAE from %s (%s)", folder, dtype)
    return AutoencoderKL.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                         use_safetensors=True)


def share_modules(pipe, classes: Mapping[str, type], dtype: torch.dtype) -> dict:
    """A pipeline of each class (by mode) over `pipe`'s modules, which are not copied.
    diffusers' from_pipe casts the modules it shares to its dtype, float32 unless told:
    told `pipe`'s own, it leaves them as they are."""
    return {mode: cls.from_pipe(pipe, dtype=dtype) for mode, cls in classes.items()}


# safetensors' names of the dtypes a checkpoint may hold; FP8 weights (as FLUX files are
# also shared) are converted to bfloat16, which holds every FP8 value exactly.
_FILE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                "F8_E4M3": torch.bfloat16, "F8_E5M2": torch.bfloat16}
# ComfyUI's names of an FP8 weight's scale ("scaled" FP8 files; the older name first), and
# of what only FP8 matrix products read: the activations' scale, the layer's format, the
# file's mark.
_SCALES = ("scale_weight", "weight_scale")
_FP8_PRODUCTS_ONLY = ("scale_input", "input_scale", "comfy_quant", "scaled_fp8")
# A name each kind's denoiser has in its single files (SDXL's is the UNet's prefix).
_DENOISER = {"sdxl": "model.diffusion_model.", "sdxl-refiner": "model.diffusion_model.",
             "flux": "double_blocks."}


def converted_checkpoint(checkpoint: Path, configs: Path, cache_dir: Path, kind: str) -> Path:
    """The diffusers folder of a single-file checkpoint of `kind` (sdxl, sdxl-refiner,
    flux), as fine-tunes are shared, read with the configs (and, for FLUX, the other
    modules) of the folder `configs`. Converted once per machine into the cache, in the
    dtype of the file's UNet or transformer, under a name from the file's and configs'
    SHA-256: later starts, and the other replicas, load the folder."""
    from safetensors import safe_open

    from deployments.once import built_once
    from serve.versions import checkpoint_key

    with safe_open(checkpoint, "pt") as f:  # the first tensor may be integer position ids
        names = f.keys()  # the handle itself is not iterable
        first = next((k for k in names if _DENOISER[kind] in k), None)
        dtype = _FILE_DTYPES.get(first and f.get_slice(first).get_dtype(), torch.float32)
        scaled = _scales(f, checkpoint)  # diffusers' converter would drop the scales

    def convert(folder: Path) -> None:
        log.info("converting %s (%s) with %s", checkpoint, dtype, configs)
        if kind == "sdxl":
            _convert_sdxl(checkpoint, configs, dtype, folder, scaled)
        else:  # diffusers' converter takes the tensors, too
            source = _dequantized(checkpoint, dtype) if scaled else str(checkpoint)
            _convert_denoiser(source, configs, dtype, folder, kind)

    key = checkpoint_key(checkpoint, configs, cache_dir)
    return built_once(cache_dir / "converted" / f"{checkpoint.stem}-{key}", convert)


def _convert_sdxl(checkpoint: Path, configs: Path, dtype: torch.dtype, folder: Path,
                  scaled: list[str]) -> None:
    """The whole pipeline is in the file (original layout): UNet, VAE, both text encoders.
    diffusers' pipeline converter reads files only, so a scaled FP8 file's weights are
    written dequantized beside the folder first, and that file is removed after."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    source = folder.with_name(folder.name + ".dequantized.safetensors") if scaled else None
    if source is not None:
        save_file(_dequantized(checkpoint, dtype), str(source))
    try:
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(source or checkpoint), config=str(configs), local_files_only=True, dtype=dtype)
        pipe.save_pretrained(folder)
    finally:
        if source is not None:
            source.unlink(missing_ok=True)


def _convert_denoiser(checkpoint: str | dict, configs: Path, dtype: torch.dtype,
                      folder: Path, kind: str) -> None:
    """The file's denoiser alone is read: a FLUX file is the transformer alone (Black
    Forest Labs' layout); of a refiner's file (original layout) the refiner reads only the
    UNet, taking text_encoder_2 and the VAE from the base model. The folder links the rest
    of `configs` (text encoders, VAE, tokenizers, scheduler), which is not copied."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls, name = ((FluxTransformer2DModel, "transformer") if kind == "flux" else
                 (UNet2DConditionModel, "unet"))
    denoiser = cls.from_single_file(checkpoint, config=str(configs), subfolder=name,
                                    local_files_only=True, dtype=dtype)
    denoiser.save_pretrained(folder / name)
    for entry in configs.resolve().iterdir():
        if entry.name != name:
            (folder / entry.name).symlink_to(entry)


def _scales(f, checkpoint: Path) -> list[str]:
    """The names of the FP8 weights' scales in the open file `f`, checked: one per tensor
    or one per row of the weight, as ComfyUI's FP8 formats have. Others (blocks, as FP4
    formats have) are refused, naming the tensor."""
    names = set(f.keys())
    scales = sorted(k for k in names if k.rpartition(".")[2] in _SCALES)
    for name in scales:
        weight, scale = name.rpartition(".")[0] + ".weight", f.get_slice(name).get_shape()
        rows = f.get_slice(weight).get_shape()[:1] if weight in names else None
        if rows is None or math.prod(scale) not in (1, *rows):
            raise ValueError(f"{checkpoint}: the scale {name} {tuple(scale)} is neither one "
                             "per tensor nor one per row of its weight")
    return scales


def _dequantized(checkpoint: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of a "scaled" FP8 file, each scaled weight multiplied by its scale (one
    per tensor or per output row, as `_scales` checked) into `dtype`, as ComfyUI computes
    them; the scales and what only FP8 products read are left out."""
    from safetensors.torch import load_file

    state = load_file(checkpoint)
    for name in [k for k in state if k.rpartition(".")[2] in _SCALES]:
        scale, weight_name = state.pop(name).float(), name.rpartition(".")[0] + ".weight"
        weight = state[weight_name]
        rows = scale.reshape(-1, *[1] * (weight.dim() - 1))
        state[weight_name] = (weight.float() * rows).to(dtype)
    return {k: v for k, v in state.items() if k.rpartition(".")[2] not in _FP8_PRODUCTS_ONLY}
