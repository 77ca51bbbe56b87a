"""A folder of two IP-Adapters for the tiny SDXL, as h94/IP-Adapter holds several beside one
image encoder: the embedded tiny adapter's files and a random "plus" adapter
(ip-adapter-plus_sdxl_vit-h's kind, which reads the encoder's hidden states)."""

import shutil
from pathlib import Path

SUBFOLDER, FIRST, ENCODER = "sdxl_models", "ip-adapter_sdxl.safetensors", "image_encoder"
PLUS = "ip-adapter-plus_sdxl.safetensors"


def two_adapters(folder: Path, cache_dir: Path, tiny_sdxl_path: Path, seed: int = 7) -> Path:
    """`folder` made to hold the tiny adapter (FIRST) and a plus one (PLUS) in SUBFOLDER,
    with the tiny adapter's image encoder."""
    import torch
    from diffusers import UNet2DConditionModel

    from deployments.tiny import TINY_SDXL_IP_ADAPTER, ensure_embedded
    from deployments.tiny_ip_adapters import TINY_IMAGE_ENCODER, build_random_plus_ip_adapter

    shutil.copytree(ensure_embedded(TINY_SDXL_IP_ADAPTER, cache_dir) / SUBFOLDER,
                    folder / SUBFOLDER)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet")
    build_random_plus_ip_adapter(folder / SUBFOLDER / PLUS, unet, TINY_IMAGE_ENCODER)
    return folder
