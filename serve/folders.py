"""The checks of what a model's paths must hold, run when the config's paths are checked
at start-up: a diffusers folder or a single-file checkpoint with its configs, of the
FLUX.1 tool the model says it is, with an inpainting UNet exactly when it says so, and a
VAE of the family's latents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from serve.model_parts import ConfigError

if TYPE_CHECKING:
    from serve.model_config import ModelConfig

# The input channels of an SDXL inpainting UNet: 4 of noise, 1 of mask, 4 of the masked
# image (a plain UNet takes the 4 of noise).
INPAINTING_UNET_CHANNELS = 9
# Each tool's pipeline class (a folder's model_index.json names it), and what goes wrong
# when a folder of it is served as another kind.
_TOOL_PIPELINES = {
    "kontext": ("FluxKontextPipeline", "its input images are then edited as references"),
    "fill": ("FluxFillPipeline", "its transformer takes an image and a mask beside the noise"),
    "canny": ("FluxControlPipeline", "its transformer takes a control image beside the noise"),
    "depth": ("FluxControlPipeline", "its transformer takes a control image beside the noise"),
}


# The modules a single-file checkpoint reads from its `configs_from` folder's weights (an
# SDXL file holds the whole pipeline; a refiner's, its UNet and modules the refiner takes
# from the base model).
_MODULES_FROM_CONFIGS = {"sdxl": (), "flux": ("vae", "text_encoder", "text_encoder_2"),
                         "sdxl-refiner": ()}


def check_model_files(model: ModelConfig, where: str) -> None:
    """Raise ConfigError naming the field (below `where`, e.g. models.0) of the first of
    `model`'s paths that does not exist or does not hold what its field reads."""
    _check_weights(model, where)
    for name, net in model.controlnets.items():
        net.check_files(f"{where}.controlnets.{name}", model.family)
    if model.ip_adapter is not None:
        model.ip_adapter.check_files(f"{where}.ip_adapter", model.family)
    if model.redux is not None:
        model.redux.check_files(f"{where}.redux")
    for name, upscaler in model.upscalers.items():
        upscaler.check_files(f"{where}.upscalers.{name}")
    if model.depth_estimator is not None:
        model.depth_estimator.check_files(f"{where}.depth_estimator")
    checker = model.safety_checker
    if checker is not None and not checker.path.exists():
        raise ConfigError(f"{where}.safety_checker.path: {checker.path} does not exist")
    for name in ("config.json", "preprocessor_config.json") if checker else ():
        if not (checker.path / name).is_file():
            raise ConfigError(f"{where}.safety_checker.path: {checker.path} holds no {name} "
                              "(a StableDiffusionSafetyChecker folder)")


def _check_weights(model: ModelConfig, where: str) -> None:
    """The pipeline's own: its folder or file, refiner, VAE, embeddings and merged LoRAs."""
    refiner = model.refiner
    check_pipeline(where, "", model.path, model.configs_from, model.family)
    check_flux_kind(where, model.path, model.configs_from, model.flux_kind)
    if model.family == "sdxl":
        check_inpainting_unet(where, model.path, model.configs_from, model.inpainting)
    check_pipeline(where, "refiner.", refiner and refiner.path,
                   refiner and refiner.configs_from, "sdxl-refiner")
    check_vae(where, model.vae, model.family)
    for j, embedding in enumerate(model.textual_inversions):
        if not embedding.path.is_file() or embedding.path.suffix != ".safetensors":
            raise ConfigError(f"{where}.textual_inversions.{j}.path: {embedding.path} is not "
                              "a .safetensors file")
    for j, lora in enumerate(model.merged_loras):
        if not lora.path.is_file():
            raise ConfigError(f"{where}.merged_loras.{j}.path: {lora.path} is not a file")


def check_pipeline(where: str, prefix: str, path: Path | None, configs_from: Path | None,
                   kind: str) -> None:
    """Raise ConfigError naming the field (`prefix` + path or configs_from) unless `path`
    is a diffusers folder, or a `.safetensors` checkpoint with a diffusers folder
    `configs_from` holding the weights the file lacks; None: embedded."""
    fields = {f"{where}.{prefix}path": path, f"{where}.{prefix}configs_from": configs_from}
    for field, folder in fields.items():
        if folder is not None and not folder.exists():
            raise ConfigError(f"{field}: {folder} does not exist")
    single = path is not None and path.is_file()
    folders = list(fields.items())
    for field, folder in folders[1:] if single else folders:  # a file is no folder
        if folder is not None and not (folder / "model_index.json").is_file():
            raise ConfigError(f"{field}: {folder} is not a diffusers folder "
                              "(no model_index.json)")
    if configs_from is not None and not single:
        raise ConfigError(f"{where}.{prefix}configs_from: goes only with a single-file path")
    if single and (path.suffix != ".safetensors" or configs_from is None):
        raise ConfigError(f"{where}.{prefix}path: {path} is a file: only a .safetensors "
                          "checkpoint with configs_from is read")
    for module in _MODULES_FROM_CONFIGS[kind] if single else ():
        if not any((configs_from / module).glob("*.safetensors")):
            raise ConfigError(
                f"{where}.{prefix}configs_from: {configs_from / module} holds no .safetensors "
                f"weights: a {kind} file holds the transformer alone, and its "
                f"{', '.join(_MODULES_FROM_CONFIGS[kind])} are read from this folder")


def check_flux_kind(where: str, path: Path | None, configs_from: Path | None,
                    kind: str | None) -> None:
    """Raise ConfigError unless the pipeline folder (`path`, or a single file's
    `configs_from`) is the FLUX.1 tool's (Kontext, Fill, Canny) exactly when the model
    says it is `kind`: a Kontext folder loads into FLUX's pipeline and the reverse, and
    then misreads references; a Fill, Canny or Depth folder's transformer takes other
    inputs. (Canny and Depth folders are both FluxControlPipelines: the name does not tell
    one from the other.)"""
    folder = configs_from if configs_from is not None else path
    if folder is None or not (folder / "model_index.json").is_file():
        return
    name = _config_value(folder / "model_index.json", "_class_name")
    for tool, (pipeline, why) in _TOOL_PIPELINES.items():
        if kind == tool and name != pipeline:
            raise ConfigError(f"{where}.{tool}: {folder} holds a {name} folder, not FLUX.1 "
                              f"{tool.title()} ({pipeline})")
        if kind != tool and name == pipeline and _TOOL_PIPELINES.get(kind, ("",))[0] != name:
            raise ConfigError(f"{where}.{tool}: {folder} holds FLUX.1 {tool.title()} weights: "
                              f"set {tool}: true ({why})")


def check_inpainting_unet(where: str, path: Path | None, configs_from: Path | None,
                          inpainting: bool) -> None:
    """Raise ConfigError unless the UNet of the folder (`path`, or a single file's
    `configs_from`) takes an inpainting UNet's inputs exactly when the model says
    `inpainting`: either way, the other kind of UNet fails its first call."""
    folder = configs_from if configs_from is not None else path
    if folder is None or not (folder / "unet" / "config.json").is_file():
        return
    channels = _config_value(folder / "unet" / "config.json", "in_channels")
    inpainting_unet = channels == INPAINTING_UNET_CHANNELS
    if inpainting and not inpainting_unet:
        raise ConfigError(f"{where}.inpainting: {folder / 'unet'} takes {channels} input "
                          f"channels, not an inpainting UNet's {INPAINTING_UNET_CHANNELS}")
    if inpainting_unet and not inpainting:
        raise ConfigError(f"{where}.inpainting: {folder / 'unet'} is an inpainting UNet "
                          f"({channels} input channels: noise, mask, masked image): set "
                          "inpainting: true")


def _config_value(file: Path, key: str):
    """`key` of a JSON config file; None where the file cannot be read as an object."""
    try:
        return json.loads(file.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


# The latent channels of each family's VAE.
_VAE_LATENT_CHANNELS = {"sdxl": 4, "flux": 16}


def check_vae(where: str, vae: Path | None, family: str) -> None:
    """Raise ConfigError naming `vae` unless it is None or a diffusers AutoencoderKL folder
    with safetensors weights whose latents have the family's channels."""
    if vae is None:
        return
    config = vae / "config.json"
    if not config.is_file() or not any(vae.glob("*.safetensors")):
        raise ConfigError(f"{where}.vae: {vae} is not a diffusers VAE folder (config.json "
                          "and .safetensors weights)")
    kind = _config_value(config, "_class_name")
    if kind != "AutoencoderKL":
        raise ConfigError(f"{where}.vae: {vae} holds a {kind}, not an AutoencoderKL")
    channels, wanted = _config_value(config, "latent_channels"), _VAE_LATENT_CHANNELS[family]
    if channels != wanted:
        raise ConfigError(f"{where}.vae: {vae} makes latents of {channels} channels; a "
                          f"{family} model's have {wanted}")
