"""A diffusers SDXL folder written as one checkpoint in the original (Stability's
generative-models) layout, as fine-tunes are shared: the key names and shapes that
diffusers' single-file loader reads back."""

from pathlib import Path

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    name, _, param = rest.partition(".")
    return f"{_RESNET[name]}.{param}"


def _unet_key(key: str, layers: int, with_attention: set[int]) -> str:
    """A UNet key in the original layout: input, middle and output blocks numbered
    through; a down block is `layers` layers and a downsampler, an up block one layer more
    (its upsampler after the last layer's attention, if any)."""
    head, _, param = key.rpartition(".")
    if head in _UNET_TOP:
        return f"{_UNET_TOP[head]}.{param}"
    p = key.split(".")
    if p[0] == "mid_block":
        rest = ".".join(p[3:])
        return (f"middle_block.{2 * int(p[2])}.{_resnet(rest)}" if p[1] == "resnets"
                else f"middle_block.1.{rest}")
    block, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
    layer = f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"
    if p[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{param}"
        return f"input_blocks.{block * (layers + 1) + j + 1}.{layer}"
    if kind == "upsamplers":
        last = block * (layers + 1) + layers
        return f"output_blocks.{last}.{2 if block in with_attention else 1}.conv.{param}"
    return f"output_blocks.{block * (layers + 1) + j}.{layer}"


def _vae_key(key: str, up_blocks: int) -> str:
    side, *p = key.replace("conv_shortcut", "nin_shortcut").replace(
        "conv_norm_out", "norm_out").split(".")
    if p[0] == "down_blocks":
        return (f"{side}.down.{p[1]}.block.{'.'.join(p[3:])}" if p[2] == "resnets"
                else f"{side}.down.{p[1]}.downsample.conv.{p[-1]}")
    if p[0] == "up_blocks":
        block = up_blocks - 1 - int(p[1])  # numbered from the bottom
        return (f"{side}.up.{block}.block.{'.'.join(p[3:])}" if p[2] == "resnets"
                else f"{side}.up.{block}.upsample.conv.{p[-1]}")
    if p[0] == "mid_block" and p[1] == "resnets":
        return f"{side}.mid.block_{int(p[2]) + 1}.{'.'.join(p[3:])}"
    if p[0] == "mid_block":
        return f"{side}.mid.attn_1.{_VAE_ATTENTION['.'.join(p[3:-1])]}.{p[-1]}"
    return ".".join([side, *p])


def _open_clip(state: dict) -> dict:
    """text_encoder_2 as OpenCLIP names it: q, k and v in one in_proj, the projection
    transposed."""
    out, qkv = {}, {}
    names = {"embeddings.position_embedding.weight": "positional_embedding",
             "embeddings.token_embedding.weight": "token_embedding.weight",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key in names:
            out[names[key]] = value
        else:  # encoder.layers.<i>.<module>.<param>
            _, _, i, *rest = key.split(".")
            base, module = f"transformer.resblocks.{i}.", ".".join(rest)
            if rest[0] == "self_attn" and rest[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault((base, rest[2]), {})[rest[1]] = value
                continue
            for new, old in (("self_attn.", "attn."), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                             ("mlp.fc2", "mlp.c_proj")):
                module = module.replace(new, old)
            out[base + module] = value
    for (base, param), parts in qkv.items():
        out[f"{base}attn.in_proj_{param}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def save_single_file(pipe, file: Path) -> None:
    """Write `pipe` (a StableDiffusionXLPipeline, or a refiner's img2img pipeline, without
    text_encoder) as one original-layout safetensors file."""
    from safetensors.torch import save_file

    unet = pipe.unet.config
    with_attention = {i for i, t in enumerate(unet.up_block_types) if "CrossAttn" in t}
    state = {f"model.diffusion_model.{_unet_key(k, unet.layers_per_block, with_attention)}": v
             for k, v in pipe.unet.state_dict().items()}
    for key, value in pipe.vae.state_dict().items():
        if ".attentions." in key and value.ndim == 2:
            value = value[:, :, None, None]  # the VAE's attention projections are 1×1 convs
        state[f"first_stage_model.{_vae_key(key, len(pipe.vae.config.up_block_types))}"] = value
    encoders = [pipe.text_encoder] if pipe.text_encoder is not None else []
    for key, value in encoders[0].state_dict().items() if encoders else ():
        if "position_ids" not in key:
            name = key if key.startswith("text_model.") else f"text_model.{key}"
            state[f"conditioner.embedders.0.transformer.{name}"] = value
    state |= {f"conditioner.embedders.{len(encoders)}.model.{k}": v for k, v in _open_clip(
        {k: v for k, v in pipe.text_encoder_2.state_dict().items() if "position_ids" not in k}
    ).items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))


# A FLUX transformer's names in Black Forest Labs' layout (as flux1-dev.safetensors and
# the fine-tunes made from it are shared): renamed as they are, or q, k and v (and, in the
# single-stream blocks, the MLP's input) in one matrix.
_FLUX_TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "context_embedder": "txt_in", "x_embedder": "img_in",
             "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
_FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm",
                "attn.norm_added_k": "txt_attn.norm.key_norm",
                "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm", "proj_out": "linear2"}
_FLUX_JOINED = {("transformer_blocks", "attn.to_q"): ("img_attn.qkv", 0, 3),
                ("transformer_blocks", "attn.to_k"): ("img_attn.qkv", 1, 3),
                ("transformer_blocks", "attn.to_v"): ("img_attn.qkv", 2, 3),
                ("transformer_blocks", "attn.add_q_proj"): ("txt_attn.qkv", 0, 3),
                ("transformer_blocks", "attn.add_k_proj"): ("txt_attn.qkv", 1, 3),
                ("transformer_blocks", "attn.add_v_proj"): ("txt_attn.qkv", 2, 3),
                ("single_transformer_blocks", "attn.to_q"): ("linear1", 0, 4),
                ("single_transformer_blocks", "attn.to_k"): ("linear1", 1, 4),
                ("single_transformer_blocks", "attn.to_v"): ("linear1", 2, 4),
                ("single_transformer_blocks", "proj_mlp"): ("linear1", 3, 4)}


_FLUX_BLOCKS = {"transformer_blocks": ("double_blocks", _FLUX_DOUBLE),
                "single_transformer_blocks": ("single_blocks", _FLUX_SINGLE)}


def save_flux_transformer_file(transformer, file: Path, dtype: torch.dtype | None = None,
                               prefix: str = "") -> None:
    """Write a FluxTransformer2DModel as one safetensors file in Black Forest Labs' layout,
    its tensors cast to `dtype` if given, each name after `prefix` (ComfyUI's files have
    `model.diffusion_model.`)."""
    from safetensors.torch import save_file

    state, joined = {}, {}
    for key, value in transformer.state_dict().items():
        module, _, param = key.rpartition(".")
        if module in _FLUX_TOP:
            if module == "norm_out.linear":  # diffusers keeps (scale, shift), BFL (shift, scale)
                value = torch.cat(value.chunk(2)[::-1])
            state[f"{_FLUX_TOP[module]}.{param}"] = value
            continue
        kind, i, rest = module.split(".", 2)
        block, names = _FLUX_BLOCKS[kind]
        if (kind, rest) in _FLUX_JOINED:
            name, at, parts = _FLUX_JOINED[kind, rest]
            joined.setdefault(f"{block}.{i}.{name}.{param}", [None] * parts)[at] = value
        else:  # the RMS norms' weights are `scale`s there
            state[f"{block}.{i}.{names[rest]}.{'scale' if 'norm.' in names[rest] else param}"] = value
    state |= {k: torch.cat(parts) for k, parts in joined.items()}
    save_file({prefix + k: (v if dtype is None else v.to(dtype)).contiguous()
               for k, v in state.items()}, str(file))


def scaled_fp8(state: dict[str, torch.Tensor], scale: str, per_row: bool,
               dtype: torch.dtype = torch.bfloat16):
    """(`state` as ComfyUI's "scaled" FP8 files hold it, the values it stands for). Each
    block's matrix is stored in FP8 e4m3 divided by a float32 scale (its largest magnitude
    over 448, per tensor or per row) named `<layer>.<scale>`, beside an activation scale
    and the file's mark; the values are the FP8 matrices times their scales, in `dtype`."""
    fp8 = torch.float8_e4m3fn
    file, values = {"scaled_fp8": torch.zeros(0, dtype=fp8)}, {}
    for key, value in state.items():
        if not (key.endswith(".weight") and value.dim() == 2 and "blocks." in key):
            file[key] = values[key] = value
            continue
        layer, magnitude = key.removesuffix(".weight"), value.float().abs()
        scales = (magnitude.amax(dim=1) if per_row else magnitude.amax()) / 448
        stored = (value.float() / scales.reshape(-1, 1)).to(fp8)
        file |= {key: stored, f"{layer}.{scale}": scales,
                 f"{layer}.{'scale_input' if scale == 'scale_weight' else 'input_scale'}":
                     torch.ones(())}
        values[key] = (stored.float() * scales.reshape(-1, 1)).to(dtype)
    return file, values
