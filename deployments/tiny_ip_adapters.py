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
    save_file({k: v.to(getattr(torch, dtype)).contiguous()
               for k, v in (state | _image_attention(unet)).items()},
              models / "ip-adapter_sdxl.safetensors")


def _image_attention(unet, gain: float = 1.0) -> dict:
    """Each cross-attention's `ip_adapter.<n>.to_k_ip/to_v_ip`, numbered as the original
    code numbers the UNet's attention layers: the text projections plus noise, times
    `gain`."""
    import torch

    state = {}
    for number, name in enumerate(unet.attn_processors):  # attn1, attn2 of each block
        if name.endswith("attn2.processor"):
            attention = unet.get_submodule(name.removesuffix(".processor"))
            for ip, text in (("to_k_ip", attention.to_k), ("to_v_ip", attention.to_v)):
                weight = text.weight.detach().float()
                state[f"ip_adapter.{number}.{ip}.weight"] = (
                    weight + torch.randn_like(weight) * weight.std()) * gain
    return state


# diffusers' resampler names → the original plus adapters' (ip-adapter-plus_sdxl_vit-h).
_PLUS_NAMES = (("attn.to_out.0.", "0.to_out."), ("attn.to_q.", "0.to_q."), ("ln0.", "0.norm1."),
               ("ln1.", "0.norm2."), ("ff.0.", "1.0."), ("ff.1.net.0.proj.", "1.1."),
               ("ff.1.net.2.", "1.3."))


def build_random_plus_ip_adapter(file: Path, unet, encoder_config: dict,
                                 dtype: str = "float32") -> None:
    """A "plus" IP-Adapter for `unet` (ip-adapter-plus_sdxl_vit-h's kind: a resampler
    reads the image encoder's penultimate hidden states into 16 image tokens), random
    weights, saved as `file` in the original layout (its `to_kv`, `norm1`, `1.1` names),
    to sit beside an adapter's image encoder of `encoder_config` (h94/IP-Adapter keeps
    it beside ip-adapter-plus-face_sdxl_vit-h, which has the same layout). Its image
    attention is scaled up 3 times, to move a tiny model's picture visibly."""
    import torch
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from safetensors.torch import save_file

    width = unet.config.cross_attention_dim
    resampler = IPAdapterPlusImageProjection(
        embed_dims=encoder_config["hidden_size"], output_dims=width, hidden_dims=width,
        heads=max(1, width // 64), num_queries=16)
    state = {}
    for name, value in resampler.state_dict().items():
        if ".attn.to_k." in name or ".attn.to_v." in name:
            kv = name.replace(".attn.to_k.", ".0.to_kv.").replace(".attn.to_v.", ".0.to_kv.")
            state.setdefault(kv, []).append(value)  # key rows, then value rows
            continue
        for ours, theirs in _PLUS_NAMES:
            name = name.replace(ours, theirs)
        state[name] = value
    state = {f"image_proj.{k}": torch.cat(v) if isinstance(v, list) else v
             for k, v in state.items()} | _image_attention(unet, gain=3.0)
    save_file({k: v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()},
              str(file))


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
