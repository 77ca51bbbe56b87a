"""Loading a family's pipelines from local files: the first from its folder, the others
(img2img, inpainting) over the same modules; single-file SDXL checkpoints converted once
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


# safetensors' names of the dtypes a checkpoint may hold.
_FILE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def converted_checkpoint(checkpoint: Path, configs: Path, cache_dir: Path) -> Path:
    """The diffusers folder of a single-file SDXL checkpoint (original layout, as fine-tunes
    are shared), read with the configs, tokenizers and scheduler of the folder `configs`.
    Converted once per machine into the cache, in the file's own dtype, under a name from
    the file's and configs' SHA-256: later starts, and the other replicas, load the folder."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from deployments.once import built_once
    from serve.versions import checkpoint_key

    with safe_open(checkpoint, "pt") as f:  # the UNet's dtype (position ids are integers)
        names = f.keys()  # the handle itself is not iterable
        unet = next((k for k in names if k.startswith("model.diffusion_model.")), None)
        dtype = _FILE_DTYPES.get(unet and f.get_slice(unet).get_dtype(), torch.float32)

    def convert(folder: Path) -> None:
        log.info("converting %s (%s) with the configs of %s", checkpoint, dtype, configs)
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(checkpoint), config=str(configs), local_files_only=True, dtype=dtype)
        pipe.save_pretrained(folder)

    key = checkpoint_key(checkpoint, configs, cache_dir)
    return built_once(cache_dir / "converted" / f"{checkpoint.stem}-{key}", convert)
