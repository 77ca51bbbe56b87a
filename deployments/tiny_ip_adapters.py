"""Random-weight IP-Adapters in their published layouts, for the embedded tiny models and
for benchmarks at full size: h94/IP-Adapter's SDXL layout and XLabs-AI/flux-ip-adapter's
FLUX layout, each with its CLIP image encoder."""

from __future__ import annotations

from pathlib import Path

# The tiny IP-Adapters' image encoder (a CLIPVisionModelWithProjection config).
TINY_IMAGE_ENCODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
                      "projection_dim": 32}
# How far a random FLUX adapter's value projections are scaled up: trained, the image
# attention moves the picture; at random and at unit scale, it adds little beside the
# tiny transformer's own attention.
_FLUX_VALUE_GAIN = 4.0


def build_random_ip_adapter(folder: Path, unet, encoder_config: dict,
                            dtype: str = "float32") -> None:
    """An IP-Adapter for `unet` (random weights) in h94/IP-Adapter's layout: sdxl_models/
    holds ip-adapter_sdxl.safetensors (the image projection's `image_proj.*`, four tokens,
    and each cross-attention's `ip_adapter.<n>.to_k_ip/to_v_ip`, numbered as the original
    code numbers the UNet's attention layers) and image_encoder/, a CLIP vision model of
    `encoder_config`. The image key and value projections start from the text ones plus
    noise, as training starts from them."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    models = folder / "sdxl_models"
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**encoder_config))
    encoder.to(getattr(torch, dtype)).save_pretrained(models / "image_encoder",
                                                      safe_serialization=True)
    text_dim, image_dim = unet.config.cross_attention_dim, encoder.config.projection_dim
    state = {"image_proj.proj.weight": torch.randn(4 * text_dim, image_dim) * 0.2,
             "image_proj.proj.bias": torch.zeros(4 * text_dim),
             "image_proj.norm.weight": torch.ones(text_dim),
             "image_proj.norm.bias": torch.zeros(text_dim)}
    for number, name in enumerate(unet.attn_processors):  # attn1, attn2 of each block
        if name.endswith("attn2.processor"):
            attention = unet.get_submodule(name.removesuffix(".processor"))
            for ip, text in (("to_k_ip", attention.to_k), ("to_v_ip", attention.to_v)):
                weight = text.weight.detach().float()
                state[f"ip_adapter.{number}.{ip}.weight"] = (
                    weight + torch.randn_like(weight) * weight.std())
    save_file({k: v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()},
              models / "ip-adapter_sdxl.safetensors")


def build_random_flux_ip_adapter(folder: Path, transformer: dict, encoder_config: dict,
                                 dtype: str = "float32", seed: int = 0) -> None:
    """An IP-Adapter for a FLUX transformer of config `transformer` (random weights) in
    XLabs-AI/flux-ip-adapter's layout: ip_adapter.safetensors holds the image projection
    (`ip_adapter_proj_model.proj` and `.norm`: the image embedding becomes four tokens as
    wide as the prompt's) and each double-stream block's image key and value projections
    (`double_blocks.<n>.processor.ip_adapter_double_stream_k_proj/v_proj`, weights and
    biases); image_encoder/ is a CLIP vision model of `encoder_config` (XLabs' is
    openai/clip-vit-large-patch14)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**encoder_config))
    encoder.to(getattr(torch, dtype)).save_pretrained(folder / "image_encoder",
                                                      safe_serialization=True)
    text_dim, image_dim = transformer["joint_attention_dim"], encoder.config.projection_dim
    inner = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    state = {"ip_adapter_proj_model.proj.weight": torch.randn(4 * text_dim, image_dim) * 0.2,
             "ip_adapter_proj_model.proj.bias": torch.zeros(4 * text_dim),
             "ip_adapter_proj_model.norm.weight": torch.ones(text_dim),
             "ip_adapter_proj_model.norm.bias": torch.zeros(text_dim)}
    for block in range(transformer["num_layers"]):
        stem = f"double_blocks.{block}.processor.ip_adapter_double_stream"
        for part, gain in (("k", 1.0), ("v", _FLUX_VALUE_GAIN)):
            state[f"{stem}_{part}_proj.weight"] = (
                torch.randn(inner, text_dim) * gain / text_dim ** 0.5)
            state[f"{stem}_{part}_proj.bias"] = torch.zeros(inner)
    save_file({k: v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()},
              folder / "ip_adapter.safetensors")
