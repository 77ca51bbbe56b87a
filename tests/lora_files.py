"""Random LoRA adapters made with PEFT on the tiny models, as PEFT and diffusers save them."""

import torch

RANK = 4
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_config(targets, **options):
    """A LoraConfig of rank 4 and alpha 4 on `targets` unless `options` say otherwise."""
    from peft import LoraConfig

    return LoraConfig(**({"r": RANK, "lora_alpha": RANK, "target_modules": targets,
                          "init_lora_weights": False} | options))


def random_lora(model, targets, seed, **options):
    """A random LoRA on `model`'s `targets` (`lora_config`), as PEFT saves it."""
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    model.add_adapter(lora_config(targets, **options), adapter_name="made")
    state = {k: v.contiguous() for k, v in
             get_peft_model_state_dict(model, adapter_name="made").items()}
    # diffusers' models and transformers' name the removal differently
    (getattr(model, "delete_adapters", None) or model.delete_adapter)("made")
    return state


def save_lora(folder, name, parts, metadata=True, pipeline=None):
    """Save (prefix → (state, LoraConfig)) with the `pipeline` class's diffusers writer
    (default: SDXL's) as `<name>.safetensors`; with `metadata`, each model's LoraConfig goes
    into the file as diffusers' training scripts put it (`lora_adapter_metadata`)."""
    from diffusers import StableDiffusionXLPipeline

    layers = {f"{prefix}_lora_layers": state for prefix, (state, _) in parts.items()}
    configs = {f"{prefix}_lora_adapter_metadata": config.to_dict()
               for prefix, (_, config) in parts.items()} if metadata else {}
    (pipeline or StableDiffusionXLPipeline).save_lora_weights(
        str(folder), weight_name=f"{name}.safetensors", **layers, **configs)
