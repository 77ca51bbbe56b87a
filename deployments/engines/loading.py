"""Loading a family's pipelines from local files: the first from its folder, the others
(img2img, inpainting) over the same modules; single-file checkpoints converted once
into a folder."""

from __future__ import annotations

import logging
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


def share_modules(pipe, classes: Mapping[str, type], dtype: torch.dtype) -> dict:
    """A pipeline of each class (by mode) over `pipe`'s modules, which are not copied.
    diffusers' from_pipe casts the modules it shares to its dtype, float32 unless told:
    told `pipe`'s own, it leaves them as they are."""
    return {mode: cls.from_pipe(pipe, dtype=dtype) for mode, cls in classes.items()}


# safetensors' names of the dtypes a checkpoint may hold; FP8 weights (as FLUX files are
# also shared) are converted to bfloat16, which holds every FP8 value exactly.
_FILE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                "F8_E4M3": torch.bfloat16, "F8_E5M2": torch.bfloat16}
# A name each family's denoiser has in its single files (SDXL's is the UNet's prefix).
_DENOISER = {"sdxl": "model.diffusion_model.", "flux": "double_blocks."}


def converted_checkpoint(checkpoint: Path, configs: Path, cache_dir: Path, family: str) -> Path:
    """The diffusers folder of a single-file checkpoint, as fine-tunes are shared, read with
    the configs (and, for FLUX, the other modules) of the folder `configs`. Converted once
    per machine into the cache, in the dtype of the file's UNet or transformer, under a
    name from the file's and configs' SHA-256: later starts, and the other replicas, load
    the folder."""
    from safetensors import safe_open

    from deployments.once import built_once
    from serve.versions import checkpoint_key

    with safe_open(checkpoint, "pt") as f:  # the first tensor may be integer position ids
        names = f.keys()  # the handle itself is not iterable
        first = next((k for k in names if _DENOISER[family] in k), None)
        dtype = _FILE_DTYPES.get(first and f.get_slice(first).get_dtype(), torch.float32)
    scaled = next((k for k in names if k.endswith("scale_weight")), None)
    if scaled is not None:  # diffusers' converters would drop the scales: wrong weights
        raise ValueError(f"{checkpoint} holds FP8 weights with scales ({scaled}), which "
                         "are not read: convert it to bfloat16 first")

    def convert(folder: Path) -> None:
        log.info("converting %s (%s) with %s", checkpoint, dtype, configs)
        (_convert_sdxl if family == "sdxl" else _convert_flux)(checkpoint, configs, dtype, folder)

    key = checkpoint_key(checkpoint, configs, cache_dir)
    return built_once(cache_dir / "converted" / f"{checkpoint.stem}-{key}", convert)


def _convert_sdxl(checkpoint: Path, configs: Path, dtype: torch.dtype, folder: Path) -> None:
    """The whole pipeline is in the file (original layout): UNet, VAE, both text encoders."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(
        str(checkpoint), config=str(configs), local_files_only=True, dtype=dtype)
    pipe.save_pretrained(folder)


def _convert_flux(checkpoint: Path, configs: Path, dtype: torch.dtype, folder: Path) -> None:
    """The file is the transformer alone (Black Forest Labs' layout); the folder links the
    rest of `configs` (text encoders, VAE, tokenizers, scheduler), which is not copied."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_single_file(
        str(checkpoint), config=str(configs), subfolder="transformer", local_files_only=True,
        dtype=dtype)
    transformer.save_pretrained(folder / "transformer")
    for entry in configs.resolve().iterdir():
        if entry.name != "transformer":
            (folder / entry.name).symlink_to(entry)
