"""The embedded tiny FLUX: a FLUX.1-architecture pipeline with random weights.

Built like the tiny SDXL (deterministically, saved in diffusers format with safetensors,
loaded through `FluxPipeline.from_pretrained`): a CLIP text encoder and a T5 encoder with
tokenizers generated here, a FLUX transformer with double- and single-stream blocks,
guidance embedding (dev-style), rotary position axes, and a 16-channel VAE whose latents
the pipeline packs 2x2, as in the real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from serve.steering import EMBEDDED_CONTROLNETS

_SEED = 20261123
# T5 reads this many tokens per prompt (the real schnell uses 256, dev 512).
T5_TOKENS = 256

TINY_FLUX_CONFIGS = {
    "transformer": {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 2,
                    "attention_head_dim": 16, "num_attention_heads": 2,
                    "joint_attention_dim": 32, "pooled_projection_dim": 32,
                    "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]},
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 1,
            "block_out_channels": [8, 16, 16, 16], "norm_num_groups": 8, "sample_size": 64,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "use_quant_conv": False,
            "use_post_quant_conv": False, "shift_factor": 0.0609, "scaling_factor": 0.3611},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77,
                     "projection_dim": 32, "hidden_act": "quick_gelu"},
    "text_encoder_2": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
                       "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu"},
    # FLUX.1-dev's scheduler: flow matching with a shift that grows with the image size.
    "scheduler": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
}


def _t5_tokenizer(tokens: int = T5_TOKENS):
    """A SentencePiece-style unigram tokenizer reading `tokens` per prompt: T5's special
    tokens, printable ASCII, the word-start marker and a few whole words."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    pieces += [("▁" + w, -1.0) for w in ("a", "the", "of", "photo", "on", "with", "in")]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.model_max_length = tokens
    return tokenizer


def build_random_flux(folder: Path, configs: dict, dtype: str = "float32",
                      device: str = "cpu", tool: str | None = None) -> None:
    """Save a FLUX pipeline with random weights built from `configs` (keys transformer,
    vae, text_encoder, text_encoder_2, scheduler; optional tokenizer_2.model_max_length)
    in diffusers format with safetensors.

    Deterministic for given configs and device. Each module is built on `device` and cast
    to `dtype` before the next one is built, so the full FLUX.1-dev (12 B transformer
    parameters) fits in one GPU's memory while it is made. The text encoders' vocabulary is
    at least the generated tokenizers'; a larger one costs what the real model's does.
    `tool`: saved as a FLUX.1 Kontext pipeline ("kontext": the same modules), a FLUX.1
    Fill one ("fill": the transformer also takes the packed masked image and mask, as
    FLUX.1-Fill-dev's 384 input channels do), a FLUX.1 Canny one ("canny": it also takes
    the packed control image, 128 channels as FLUX.1-Canny-dev's) or a FLUX.1 Depth one
    ("depth": the same design as Canny's), each with its own seed.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxControlPipeline,
        FluxFillPipeline,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from deployments.tiny import public_fields
    from deployments.tiny_tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    t5_tokenizer = _t5_tokenizer(configs.get("tokenizer_2", {}).get("model_max_length",
                                                                     T5_TOKENS))
    bos, eos = len(tokenizer) - 2, len(tokenizer) - 1
    clip = public_fields(configs["text_encoder"])
    t5 = public_fields(configs["text_encoder_2"])
    clip["vocab_size"] = max(clip.get("vocab_size", 0), len(tokenizer))
    t5["vocab_size"] = max(t5.get("vocab_size", 0), len(t5_tokenizer))

    def made(module):
        return module.to(device="cpu", dtype=getattr(torch, dtype))

    pipelines = {None: FluxPipeline, "kontext": FluxKontextPipeline, "fill": FluxFillPipeline,
                 "canny": FluxControlPipeline, "depth": FluxControlPipeline}
    transformer = transformer_config(configs, tool)
    torch.manual_seed(_SEED + list(pipelines).index(tool))
    with torch.device(device):
        pipe = pipelines[tool](
            text_encoder=made(CLIPTextModel(CLIPTextConfig(
                **clip, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))),
            text_encoder_2=made(T5EncoderModel(T5Config(
                **t5, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))),
            transformer=made(FluxTransformer2DModel(**transformer)),
            vae=made(AutoencoderKL(**public_fields(configs["vae"]))),
            scheduler=FlowMatchEulerDiscreteScheduler(**public_fields(configs["scheduler"])),
            tokenizer=tokenizer, tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(folder, safe_serialization=True)


def transformer_config(configs: dict, tool: str | None = None) -> dict:
    """The transformer's config of `configs`. Beside the packed latents (each token 2x2
    latent pixels), a Fill transformer (`tool` "fill") takes the packed latents of the
    masked image and the mask packed at the image's resolution (each token 2x2 latent
    pixels of vae_scale_factor² image pixels), a Canny or Depth one ("canny", "depth") the
    packed latents of the control image; each gives the latents' channels alone."""
    from deployments.tiny import public_fields

    transformer = public_fields(configs["transformer"])
    latents = transformer.get("in_channels", 64)
    scale = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    extra = {"fill": latents + 4 * scale * scale, "canny": latents,
             "depth": latents}.get(tool or "")
    if extra is None:
        return transformer
    return transformer | {"in_channels": latents + extra, "out_channels": latents}


# name → (rank, key layout): demo adapters for the embedded FLUX, random but fixed. The
# PEFT ones cover every default FLUX target; the kohya one uses sd-scripts' BFL names.
DEMO_FLUX_LORAS = {"neon": (4, "peft"), "film-grain": (8, "peft"), "ink": (4, "kohya")}

# kohya (sd-scripts) FLUX module names → the diffusers modules each covers; a fused qkv
# covers three. The single blocks' fused `linear1` is left out: diffusers splits it at the
# full model's widths only.
_KOHYA_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",), "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",), "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",), "txt_mod_lin": ("norm1_context.linear",)}
_KOHYA_SINGLE = {"linear2": ("proj_out",), "modulation_lin": ("norm.linear",)}


def build_random_flux_loras(transformer_folder: Path, folder: Path,
                            specs: dict[str, tuple[int, str]], dtype: str = "float32") -> None:
    """Save one random, seeded LoRA per `specs` entry (name → (rank, "peft"|"kohya")) for
    the FLUX transformer in `transformer_folder`, as `<name>.safetensors` in `folder`, with
    tensors in `dtype` (the transformer is loaded in it)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from serve.model_parts import FAMILIES

    transformer = FluxTransformer2DModel.from_pretrained(transformer_folder,
                                                         torch_dtype=getattr(torch, dtype))
    for i, (name, (rank, layout)) in enumerate(sorted(specs.items())):
        torch.manual_seed(_SEED + 1 + i)
        if layout == "kohya":
            state = _kohya_lora(transformer, rank)
        else:
            transformer.add_adapter(LoraConfig(
                r=rank, lora_alpha=rank, target_modules=list(FAMILIES["flux"].lora_targets),
                init_lora_weights=False), adapter_name=name)
            state = {f"transformer.{k}": v for k, v in
                     get_peft_model_state_dict(transformer, adapter_name=name).items()}
            transformer.delete_adapters(name)
        state = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()}
        save_file(state, str(folder / f"{name}.safetensors"), metadata={"format": "pt"})


def _kohya_lora(transformer, rank: int) -> dict:
    """Random LoRA tensors in sd-scripts' FLUX layout, with alpha at half the rank."""
    import torch

    modules = dict(transformer.named_modules())
    blocks = [(f"double_blocks_{i}", f"transformer_blocks.{i}", _KOHYA_DOUBLE)
              for i in range(len(transformer.transformer_blocks))]
    blocks += [(f"single_blocks_{i}", f"single_transformer_blocks.{i}", _KOHYA_SINGLE)
               for i in range(len(transformer.single_transformer_blocks))]
    out = {}
    for kohya_block, block, names in blocks:
        for kohya, covered in names.items():
            linears = [modules[f"{block}.{m}"] for m in covered]
            fan_in = linears[0].in_features
            stem = f"lora_unet_{kohya_block}_{kohya}"
            out[f"{stem}.lora_down.weight"] = torch.randn(rank, fan_in) / fan_in**0.5
            out[f"{stem}.lora_up.weight"] = torch.randn(
                sum(m.out_features for m in linears), rank) / rank**0.5
            out[f"{stem}.alpha"] = torch.tensor(rank / 2)
    return out


# FLUX.1 Redux's image encoder (google/siglip-so400m-patch14-384's vision tower) at toy
# size: 8x8 patches, so 64 image tokens per picture where the real one gives 27x27 = 729.
_REDUX_GAIN = 5.0
TINY_SIGLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 112, "patch_size": 14}


def build_random_redux(folder: Path, siglip: dict, txt_in_features: int,
                       dtype: str = "float32", device: str = "cpu") -> None:
    """Save a FLUX.1 Redux folder (diffusers' FluxPriorReduxPipeline layout, as
    black-forest-labs/FLUX.1-Redux-dev ships it) with random weights: a SigLIP vision model
    of `siglip`, its image processor (a square of the model's image size, mean and spread
    0.5), and the image embedder projecting each image token to `txt_in_features`, the
    width of the FLUX transformer's text tokens (its joint_attention_dim). Trained, Redux's
    tokens are as large as T5's; at random, the projection's output is scaled to about the
    tiny T5's (mean magnitude near 1), so a picture weighs as much as a prompt."""
    import torch
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    side = siglip["image_size"]
    torch.manual_seed(_SEED + 7)
    with torch.device(device):
        encoder = SiglipVisionModel(SiglipVisionConfig(**siglip))
        embedder = ReduxImageEncoder(redux_dim=siglip["hidden_size"],
                                     txt_in_features=txt_in_features)
        with torch.no_grad():
            embedder.redux_down.weight.mul_(_REDUX_GAIN)
            embedder.redux_down.bias.mul_(_REDUX_GAIN)
    pipe = FluxPriorReduxPipeline(
        image_encoder=encoder.to("cpu", getattr(torch, dtype)),
        feature_extractor=SiglipImageProcessor(size={"height": side, "width": side},
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3),
        image_embedder=embedder.to("cpu", getattr(torch, dtype)))
    pipe.save_pretrained(folder, safe_serialization=True)


# A Depth Anything estimator (LiheYoung/depth-anything-large-hf's design, which FLUX.1 Depth
# [dev]'s control maps come from) at toy size: a 4-layer DINOv2 reading 56² crops.
TINY_DEPTH_ANYTHING = {
    "backbone": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
                 "intermediate_size": 64, "image_size": 56, "patch_size": 14,
                 "out_indices": [1, 2, 3, 4], "reshape_hidden_states": False},
    "head": {"reassemble_hidden_size": 32, "patch_size": 14, "neck_hidden_sizes": [8, 16, 32, 32],
             "fusion_hidden_size": 16, "head_hidden_size": 8},
    "side": 56,
}


def build_random_depth_estimator(folder: Path, configs: dict) -> None:
    """Save a Depth Anything model with random weights (transformers' layout, read by
    AutoModelForDepthEstimation) and its image processor (the shorter side to
    `configs["side"]`, a multiple of the patch size, ImageNet's mean and spread). Its
    layers take PyTorch's default initialisation and its output a bias of 1, so that a
    random one still answers in relief rather than in zeros."""
    import torch
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    torch.manual_seed(_SEED + 9)
    model = DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=Dinov2Config(**configs["backbone"]), **configs["head"]))
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            module.reset_parameters()
    with torch.no_grad():
        model.head.conv3.bias.fill_(1.0)
    side = configs["side"]
    processor = DPTImageProcessor(
        size={"height": side, "width": side}, keep_aspect_ratio=True,
        ensure_multiple_of=configs["head"]["patch_size"], resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


# InstantX's FLUX.1-dev ControlNets (a few of the transformer's blocks, each adding its
# output to the transformer's matching block) at toy size: one double- and one
# single-stream block, and a union's mode embedding (InstantX's Union: 10 modes).
TINY_FLUX_CONTROLNET = {"num_layers": 1, "num_single_layers": 1,
                        "num_mode": EMBEDDED_CONTROLNETS["tiny-flux-controlnet"][1]}
_CONTROLNET_GAIN = 2.0


def build_random_flux_controlnet(folder: Path, transformer: dict, controlnet: dict,
                                 dtype: str = "float32", device: str = "cpu") -> None:
    """Save a FluxControlNetModel (diffusers' layout, as InstantX ships theirs) for a
    transformer of config `transformer`, with `controlnet`'s block counts and modes and
    random weights. The layers that are zero before training (the control image's
    embedding and each block's output) get random ones, scaled by _CONTROLNET_GAIN so that
    the control image steers the image without drowning it, as it does once trained. Built
    on `device` (a full-size one on a GPU in seconds)."""
    import torch
    from diffusers import FluxControlNetModel

    from deployments.tiny import public_fields

    torch.manual_seed(_SEED + 11)
    with torch.device(device):
        net = FluxControlNetModel(**public_fields(transformer) | controlnet)
    zeroed = [net.controlnet_x_embedder, *net.controlnet_blocks, *net.controlnet_single_blocks]
    with torch.no_grad():
        for layer in zeroed:
            torch.nn.init.normal_(layer.weight, std=_CONTROLNET_GAIN / layer.in_features ** 0.5)
    net.to("cpu", getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
