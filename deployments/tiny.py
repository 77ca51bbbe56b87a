"""The embedded default models: tiny SDXL- and FLUX-architecture pipelines with random
weights (the recipe of FLUX and its FLUX.1 Kontext, Fill and Canny is in
`deployments.tiny_flux`).

Each is built once, deterministically, saved in diffusers format with safetensors, and then
loaded through the same `from_pretrained` path as a real checkpoint. They draw noise: they
exist so that the whole service runs on any machine without downloading weights.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from deployments.once import built_once
from deployments.tiny_tokenizer import clip_tokenizer

TINY_SDXL = "tiny-sdxl"
TINY_SDXL_REFINER = "tiny-sdxl-refiner"
TINY_SDXL_INPAINTING = "tiny-sdxl-inpainting"
TINY_SDXL_CONTROLNET = "tiny-sdxl-controlnet"
TINY_SDXL_IP_ADAPTER = "tiny-sdxl-ip-adapter"
TINY_FLUX_IP_ADAPTER = "tiny-flux-ip-adapter"
TINY_FLUX = "tiny-flux"
TINY_FLUX_KONTEXT = "tiny-flux-kontext"
TINY_FLUX_FILL = "tiny-flux-fill"
TINY_FLUX_CANNY = "tiny-flux-canny"
TINY_FLUX_REDUX = "tiny-flux-redux"
TINY_FLUX_DEPTH = "tiny-flux-depth"
TINY_DEPTH_ANYTHING = "tiny-depth-anything"
TINY_FLUX_CONTROLNET = "tiny-flux-controlnet"
TINY_ESRGAN = "tiny-esrgan"  # a folder holding TINY_ESRGAN_FILE
TINY_ESRGAN_FILE = "tiny-esrgan-x4.pth"
# Bump when the recipe below changes, so old caches are not reused.
RECIPE_VERSION = 1
_SEED = 20261122


def ensure_embedded(name: str, cache_dir: Path) -> Path:
    """Return the folder of embedded model `name`, building it once per machine.
    Raises ValueError for an unknown name."""
    builders = {TINY_SDXL: _build_tiny_sdxl, TINY_SDXL_REFINER: _build_tiny_refiner,
                TINY_SDXL_INPAINTING: _build_tiny_inpainting,
                TINY_SDXL_CONTROLNET: _build_tiny_controlnet,
                TINY_SDXL_IP_ADAPTER: _build_tiny_ip_adapter, TINY_FLUX: _build_tiny_flux,
                TINY_FLUX_KONTEXT: partial(_build_tiny_flux, tool="kontext"),
                TINY_FLUX_FILL: partial(_build_tiny_flux, tool="fill"),
                TINY_FLUX_CANNY: partial(_build_tiny_flux, tool="canny"),
                TINY_FLUX_REDUX: _build_tiny_redux,
                TINY_FLUX_DEPTH: partial(_build_tiny_flux, tool="depth"),
                TINY_DEPTH_ANYTHING: _build_tiny_depth_anything,
                TINY_FLUX_CONTROLNET: _build_tiny_flux_controlnet,
                TINY_FLUX_IP_ADAPTER: _build_tiny_flux_ip_adapter,
                TINY_ESRGAN: _build_tiny_esrgan}
    if name not in builders:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(builders)}")
    return built_once(cache_dir / f"{name}-v{RECIPE_VERSION}", builders[name])


# The tiny recipe, in the same layout as the full SDXL configs a benchmark may pass.
TINY_SDXL_CONFIGS = {
    "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
             "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [2, 4],
             "transformer_layers_per_block": [1, 1], "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 6 * 8 + 32, "cross_attention_dim": 64,
             "norm_num_groups": 8},
    # Four VAE blocks give SDXL's 8x spatial factor, so sizes behave as on the real model.
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
            "block_out_channels": [8, 16, 16, 16], "norm_num_groups": 8, "sample_size": 64,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77,
                     "projection_dim": 32, "hidden_act": "gelu"},
    "text_encoder_2": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "max_position_embeddings": 77,
                       "projection_dim": 32, "hidden_act": "gelu"},
    "scheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon"},
}


# The refiner's UNet (stable-diffusion-xl-refiner-1.0's design at the tiny size): text
# conditioning from text_encoder_2 alone, and five time ids (sizes, crop, aesthetic score).
TINY_REFINER_UNET = {**TINY_SDXL_CONFIGS["unet"], "cross_attention_dim": 32,
                     "projection_class_embeddings_input_dim": 5 * 8 + 32}


def _build_tiny_sdxl(folder: Path) -> None:
    build_random_sdxl(folder, TINY_SDXL_CONFIGS)


def _build_tiny_inpainting(folder: Path) -> None:
    """An inpainting UNet (stable-diffusion-xl-1.0-inpainting-0.1's design at the tiny
    size): the mask and the masked image's latents enter beside the noise."""
    unet = {**TINY_SDXL_CONFIGS["unet"], "in_channels": 9}
    build_random_sdxl(folder, {**TINY_SDXL_CONFIGS, "unet": unet}, inpainting=True)


def _build_tiny_refiner(folder: Path) -> None:
    build_random_sdxl(folder, {**TINY_SDXL_CONFIGS, "unet": TINY_REFINER_UNET}, refiner=True)


def _build_tiny_controlnet(folder: Path) -> None:
    """A ControlNet of the tiny SDXL's UNet design (as controlnet-canny-sdxl-1.0 is of
    SDXL's, its conditioning embedding scaled down), saved as diffusers saves one. The
    convolutions that are zero before training (its outputs, and the control image
    embedding's last) get random weights, the embedding's scaled so that the control
    image counts as much as the latents, as it does once trained."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(_SEED + 2)
    unet = UNet2DConditionModel(**public_fields(TINY_SDXL_CONFIGS["unet"]))
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64, 128))
    for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.1)
    for conv in net.controlnet_cond_embedding.modules():  # He's: features of unit scale
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight)
    net.save_pretrained(folder, safe_serialization=True)


def _build_tiny_ip_adapter(folder: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from deployments.tiny_ip_adapters import TINY_IMAGE_ENCODER, build_random_ip_adapter

    torch.manual_seed(_SEED + 3)
    unet = UNet2DConditionModel(**public_fields(TINY_SDXL_CONFIGS["unet"]))
    build_random_ip_adapter(folder, unet, TINY_IMAGE_ENCODER)


def _build_tiny_flux_ip_adapter(folder: Path) -> None:
    from deployments.tiny_flux import TINY_FLUX_CONFIGS
    from deployments.tiny_ip_adapters import TINY_IMAGE_ENCODER, build_random_flux_ip_adapter

    build_random_flux_ip_adapter(folder, TINY_FLUX_CONFIGS["transformer"], TINY_IMAGE_ENCODER,
                                 seed=_SEED + 11)


def _build_tiny_flux(folder: Path, tool: str | None = None) -> None:
    from deployments.tiny_flux import TINY_FLUX_CONFIGS, build_random_flux

    build_random_flux(folder, TINY_FLUX_CONFIGS, tool=tool)


def _build_tiny_redux(folder: Path) -> None:
    from deployments.tiny_flux import TINY_FLUX_CONFIGS, TINY_SIGLIP, build_random_redux

    width = TINY_FLUX_CONFIGS["transformer"]["joint_attention_dim"]
    build_random_redux(folder, TINY_SIGLIP, width)


def _build_tiny_depth_anything(folder: Path) -> None:
    from deployments.tiny_flux import TINY_DEPTH_ANYTHING, build_random_depth_estimator

    build_random_depth_estimator(folder, TINY_DEPTH_ANYTHING)


def _build_tiny_flux_controlnet(folder: Path) -> None:
    from deployments.tiny_flux import (
        TINY_FLUX_CONFIGS,
        TINY_FLUX_CONTROLNET,
        build_random_flux_controlnet,
    )

    build_random_flux_controlnet(folder, TINY_FLUX_CONFIGS["transformer"], TINY_FLUX_CONTROLNET)


def _build_tiny_esrgan(folder: Path) -> None:
    """A x4 RRDBNet of 8 features and 2 blocks, saved as Real-ESRGAN saves its models (a
    `.pth` holding the `params_ema` state dict)."""
    import torch

    from deployments.engines.upscalers import RRDBNet

    torch.manual_seed(_SEED + 12)
    net = RRDBNet(scale=4, features=8, blocks=2, growth=4)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": net.state_dict()}, folder / TINY_ESRGAN_FILE)


def public_fields(config: dict) -> dict:
    """A component config without its notes (keys starting with an underscore)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_random_sdxl(folder: Path, configs: dict, dtype: str = "float32",
                      refiner: bool = False, inpainting: bool = False) -> None:
    """Save an SDXL pipeline with random weights built from `configs` (keys unet, vae,
    text_encoder, text_encoder_2, scheduler) in diffusers format with safetensors; with
    `refiner`, a refiner's (an img2img pipeline without text_encoder, conditioned on the
    aesthetic score, as stable-diffusion-xl-refiner-1.0 is saved); with `inpainting`, as
    an inpainting pipeline (as stable-diffusion-xl-1.0-inpainting-0.1 is saved).

    Deterministic for given configs. The text encoders' vocabulary is at least the
    generated tokenizer's; a larger one (the real 49408) costs the same as the real model.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    vocab_size = len(tokenizer)
    bos, eos = (vocab_size - 2, vocab_size - 1)

    def text_config(name: str) -> CLIPTextConfig:
        cfg = {"vocab_size": vocab_size, **public_fields(configs[name])}
        cfg["vocab_size"] = max(cfg["vocab_size"], vocab_size)
        return CLIPTextConfig(**cfg, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)

    torch.manual_seed(_SEED + refiner)
    text_encoder = None if refiner else CLIPTextModel(text_config("text_encoder"))
    parts = {"text_encoder_2": CLIPTextModelWithProjection(text_config("text_encoder_2")),
             "unet": UNet2DConditionModel(**public_fields(configs["unet"])),
             "vae": AutoencoderKL(**public_fields(configs["vae"])),
             "scheduler": EulerDiscreteScheduler(**public_fields(configs["scheduler"])),
             "tokenizer_2": tokenizer}
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            **parts, text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False)
    else:
        cls = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline
        pipe = cls(**parts, text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.to(dtype=getattr(torch, dtype))
    pipe.save_pretrained(folder, safe_serialization=True)


TINY_SDXL_DEMO = "tiny-sdxl-demo"
TINY_FLUX_DEMO = "tiny-flux-demo"
# name → (rank, key layout): demo adapters for the embedded model, random but fixed.
DEMO_LORAS = {"pixel-art": (4, "peft"), "watercolor": (8, "peft"), "sketch": (4, "kohya")}
_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def ensure_demo_loras(name: str, cache_dir: Path) -> Path:
    """Return the folder of an embedded model's demo LoRA adapters, building it once.

    Each adapter is random with a fixed seed, made for the tiny model's denoiser and saved
    as `<name>.safetensors` in the diffusers/PEFT key layout or kohya's.
    """
    from deployments.tiny_flux import DEMO_FLUX_LORAS, build_random_flux_loras

    demos = {TINY_SDXL_DEMO: (TINY_SDXL, "unet", build_random_loras, DEMO_LORAS),
             TINY_FLUX_DEMO: (TINY_FLUX, "transformer", build_random_flux_loras,
                              DEMO_FLUX_LORAS)}
    if name not in demos:
        raise ValueError(f"unknown embedded adapters {name!r}; known: {', '.join(demos)}")
    embedded, part, build, specs = demos[name]
    model = ensure_embedded(embedded, cache_dir)
    return built_once(cache_dir / f"{name}-v{RECIPE_VERSION}",
                      lambda folder: build(model / part, folder, specs))


def build_random_loras(unet_folder: Path, folder: Path, specs: dict[str, tuple[int, str]],
                       dtype: str = "float32") -> None:
    """Save one random, seeded LoRA per `specs` entry (name → (rank, "peft"|"kohya")) for
    the UNet in `unet_folder`, as `<name>.safetensors` in `folder`."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    for i, (name, (rank, layout)) in enumerate(sorted(specs.items())):
        torch.manual_seed(_SEED + 1 + i)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=_LORA_TARGETS,
                                    init_lora_weights=False), adapter_name=name)
        state = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in
                 get_peft_model_state_dict(unet, adapter_name=name).items()}
        unet.delete_adapters(name)
        if layout == "kohya":
            state = _to_kohya(state, rank)
        else:
            state = {f"unet.{k}": v for k, v in state.items()}
        save_file(state, str(folder / f"{name}.safetensors"), metadata={"format": "pt"})


def _to_kohya(state: dict, rank: int) -> dict:
    """PEFT keys (`a.b.to_q.lora_A.weight`) in kohya's layout (`lora_unet_a_b_to_q...`)."""
    import torch

    out = {}
    for key, tensor in state.items():
        module, kind = key.rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        out[f"{stem}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = tensor
        out[f"{stem}.alpha"] = torch.tensor(float(rank))
    return out
