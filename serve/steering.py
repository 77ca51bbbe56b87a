"""The configs of what steers a model's images from pictures besides its prompt: its
ControlNets (a control image's shapes), an IP-Adapter (an image prompt), a FLUX model's
Redux (an image prompt), each with the check of the files its path must hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from serve.model_parts import ConfigError, PathOrEmbedded, _Strict

# The embedded ControlNets: their family, and their union modes (None: not a union).
EMBEDDED_CONTROLNETS = {"tiny-sdxl-controlnet": ("sdxl", None),
                        "tiny-flux-controlnet": ("flux", 10)}
# A family's ControlNet class, as a folder's config.json names it.
_CONTROLNET_CLASSES = {"sdxl": "ControlNetModel", "flux": "FluxControlNetModel"}


class ControlNetConfig(PathOrEmbedded):
    """A ControlNet: requests that name it send a control image, whose shapes the model
    then follows. For an SDXL model a diffusers ControlNetModel (canny edges, depth,
    pose...); for a FLUX model a FluxControlNetModel (InstantX's, Shakker Labs'), perhaps
    a union one, trained for several kinds of control image, each name then serving one
    of its modes (`control_mode`; one set of weights in memory for all). It runs beside
    the model's denoiser at every step, with its dtype."""

    path: Path | None = Field(None, description=(
        "Local diffusers folder of the ControlNet: config.json and its safetensors weights "
        "(e.g. controlnet-canny-sdxl-1.0, FLUX.1-dev-Controlnet-Union). Never fetched."))
    embedded: Literal[tuple(EMBEDDED_CONTROLNETS)] | None = Field(None, description=(
        "Build and use the embedded random-weight ControlNet of the tiny SDXL, or of the "
        "tiny FLUX (a union of 10 modes)."))
    variant: str | None = Field(None, description="Weights file variant, e.g. fp16.")
    conditioning_scale: float = Field(1.0, ge=0, le=4, description=(
        "How strongly the control image steers the image when the request does not say "
        "(its `controlnet_conditioning_scale`)."))
    preprocess: Literal["none", "canny", "depth"] = Field("none", description=(
        "What the control image goes through first: none (requests send the map itself: "
        "edges, depth, pose), canny (requests send a picture, whose Canny edges, white on "
        "black, are the control image) or depth (requests send a picture, whose depth map, "
        "near bright, the replica estimates with the model's `depth_estimator`)."))
    control_mode: int | None = Field(None, ge=0, le=63, description=(
        "FLUX union ControlNets (required there, refused elsewhere): which of its modes "
        "this name serves, by the number its model card gives (InstantX's Union: canny 0, "
        "tile 1, depth 2, blur 3, pose 4, gray 5, low quality 6)."))

    @model_validator(mode="after")
    def _embedded_mode(self) -> ControlNetConfig:
        if self.embedded is not None:
            check_control_mode(EMBEDDED_CONTROLNETS[self.embedded][1], self.control_mode)
        return self

    def check_files(self, where: str, family: str) -> None:
        """Raise ConfigError naming `where`'s field unless `path` is a ControlNet folder of
        the family whose union modes hold `control_mode`."""
        if self.path is None:
            return
        try:
            config = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            config = None
        wanted = _CONTROLNET_CLASSES[family]
        if not isinstance(config, dict) or config.get("_class_name") != wanted:
            raise ConfigError(f"{where}.path: {self.path} is not a {family} ControlNet folder "
                              f"(its config.json does not name {wanted})")
        try:
            check_control_mode(config.get("num_mode"), self.control_mode)
        except ValueError as exc:
            raise ConfigError(f"{where}.{exc}") from None


def check_control_mode(modes: int | None, mode: int | None) -> None:
    """ValueError unless `mode` is one of a union ControlNet's `modes` (None: not a union,
    which takes no mode)."""
    if modes is None and mode is not None:
        raise ValueError("control_mode: the ControlNet is not a union one (it has no modes)")
    if modes is not None and (mode is None or mode >= modes):
        raise ValueError(f"control_mode: the union ControlNet needs one from 0 to {modes - 1}")


# A family's IP-Adapter layout: (subfolder, weights file, image encoder), as its
# adapters are published: h94/IP-Adapter's SDXL adapters, XLabs-AI/flux-ip-adapter's
# (whose CLIP ViT-L/14 image encoder, openai/clip-vit-large-patch14, is copied beside it).
IP_ADAPTER_LAYOUTS = {"sdxl": ("sdxl_models", "ip-adapter_sdxl.safetensors", "image_encoder"),
                      "flux": ("", "ip_adapter.safetensors", "image_encoder")}
# The names of an SDXL model's further IP-Adapters (`ip_adapter.extra`).
EXTRA_IP_ADAPTER_NAME = r"^[a-z0-9][a-z0-9_-]{0,39}$"


class ExtraIPAdapterConfig(_Strict):
    """A further IP-Adapter of an SDXL model, in the first one's folder and with its image
    encoder (h94/IP-Adapter's ip-adapter-plus-face_sdxl_vit-h beside ip-adapter-plus_
    sdxl_vit-h, say): requests send it an image prompt of its own, by its name."""

    weight_name: str = Field(description=(
        "Its weights file in the first adapter's `subfolder`, e.g. "
        "ip-adapter-plus-face_sdxl_vit-h.safetensors."))
    scale: float = Field(0.6, ge=0, le=2, description=(
        "How strongly its image prompt steers when the request does not say."))


# The embedded IP-Adapters, by the family they are made for.
EMBEDDED_IP_ADAPTERS = {"tiny-sdxl-ip-adapter": "sdxl", "tiny-flux-ip-adapter": "flux"}


class IPAdapterConfig(PathOrEmbedded):
    """An IP-Adapter: requests may send an image prompt, a picture whose content and style
    the image takes on beside the text prompt. For an SDXL model one of h94/IP-Adapter's
    SDXL adapters, for a plain FLUX model XLabs' (XLabs-AI/flux-ip-adapter), each as
    diffusers' `load_ip_adapter` reads it. Its image encoder (a CLIP vision model) encodes
    each request's picture before its call; the adapter adds an attention over the
    picture's tokens to each of the UNet's cross-attentions (FLUX: to each double-stream
    block)."""

    path: Path | None = Field(None, description=(
        "Local folder the adapter's files are in (e.g. a copy of h94/IP-Adapter, or of "
        "XLabs-AI/flux-ip-adapter with openai/clip-vit-large-patch14 as its image_encoder "
        "folder). Never fetched."))
    embedded: Literal[tuple(EMBEDDED_IP_ADAPTERS)] | None = Field(None, description=(
        "Build and use the embedded random-weight IP-Adapter of the tiny SDXL or FLUX."))
    subfolder: str | None = Field(None, description=(
        "The folder under `path` that holds the weights file (diffusers' `subfolder`); "
        "default: sdxl_models (SDXL), none (FLUX)."))
    weight_name: str | None = Field(None, description=(
        "The weights file in `subfolder`, in the adapter's own layout (h94's `image_proj` "
        "and `ip_adapter` keys, or XLabs' `ip_adapter_proj_model` and `double_blocks`), "
        "e.g. ip-adapter-plus_sdxl_vit-h.safetensors; default: ip-adapter_sdxl.safetensors "
        "(SDXL), ip_adapter.safetensors (FLUX)."))
    image_encoder: str | None = Field(None, description=(
        "The image encoder's folder (a CLIPVisionModelWithProjection): a name is looked for "
        "in `subfolder`, a path with a slash under `path` (e.g. models/image_encoder, the "
        "ViT-H encoder of the vit-h adapters) or where it says if absolute; default: "
        "image_encoder."))
    scale: float = Field(0.6, ge=0, le=2, description=(
        "How strongly the image prompt steers when the request does not say (its "
        "`ip_adapter_scale`): 0 ignores it."))
    extra: dict[Annotated[str, StringConstraints(pattern=EXTRA_IP_ADAPTER_NAME)],
                ExtraIPAdapterConfig] = Field(default_factory=dict, max_length=4, description=(
        "SDXL models: further adapters by name (lowercase letters, digits, - and _), in "
        "the same folder and read with the same image encoder: a request sends each an "
        "image prompt of its own (`extra_ip_adapters`), beside or without the first's. "
        "Each adds its attention to every cross-attention."))

    @model_validator(mode="after")
    def _embedded_files(self) -> IPAdapterConfig:
        changed = [name for name in ("subfolder", "weight_name", "image_encoder", "extra")
                   if getattr(self, name)]
        if self.embedded is not None and changed:
            raise ValueError(f"{changed[0]}: the embedded IP-Adapter has only its own files; "
                             "leave subfolder, weight_name, image_encoder and extra unset")
        return self

    def weight_names(self, family: str) -> tuple[tuple[str, str], ...]:
        """(name, weights file) of each of its adapters: the first's name "", then the
        `extra` ones'."""
        return (("", self.layout(family)[1]),
                *((name, extra.weight_name) for name, extra in self.extra.items()))

    def layout(self, family: str) -> tuple[str, str, str]:
        """(subfolder, weights file, image encoder) for a model of `family`: those set,
        else the family's (IP_ADAPTER_LAYOUTS)."""
        given = (self.subfolder, self.weight_name, self.image_encoder)
        return tuple(g if g is not None else d
                     for g, d in zip(given, IP_ADAPTER_LAYOUTS[family], strict=True))

    def weights_file(self, folder: Path, family: str) -> Path:
        subfolder, weight_name, _ = self.layout(family)
        return folder / subfolder / weight_name

    def encoder_folder(self, folder: Path, family: str) -> Path:
        """Where the image encoder is read from, for the adapter's files in `folder`."""
        subfolder, _, encoder = self.layout(family)
        return encoder_folder(folder, subfolder, encoder)

    def check_files(self, where: str, family: str) -> None:
        """Raise ConfigError naming the field whose file is missing from `path`."""
        if self.path is None:
            return
        weights = self.weights_file(self.path, family)
        if not weights.is_file():
            raise ConfigError(f"{where}.weight_name: {weights} is not a file (path, "
                              "subfolder and weight_name name it)")
        for name, extra in self.extra.items():
            if not (weights.parent / extra.weight_name).is_file():
                raise ConfigError(f"{where}.extra.{name}.weight_name: "
                                  f"{weights.parent / extra.weight_name} is not a file")
        encoder = self.encoder_folder(self.path, family)
        if not (encoder / "config.json").is_file():
            raise ConfigError(f"{where}.image_encoder: {encoder} is not an image encoder "
                              "folder (no config.json)")


def encoder_folder(folder: Path, subfolder: str, encoder: str) -> Path:
    """An IP-Adapter's image encoder folder as diffusers' SDXL loader finds it: a name in
    `subfolder`, a relative path with a slash under `folder`, an absolute path as it is."""
    return folder / encoder if "/" in encoder else folder / subfolder / encoder


class ReduxConfig(PathOrEmbedded):
    """FLUX.1 Redux for a FLUX model (black-forest-labs/FLUX.1-Redux-dev, diffusers'
    FluxPriorReduxPipeline folder): requests may send an image prompt (`redux_image`), a
    picture the image is a variation of. Its SigLIP encoder and image embedder turn the
    picture into tokens the transformer reads after the prompt's (729 more for the real
    encoder's 27x27 patches), so calls with an image prompt batch apart from those
    without. Without a prompt, the image is a variation of the picture alone; with one,
    the prompt restyles it, the more the fewer picture tokens there are (`downsampling`).
    """

    path: Path | None = Field(None, description=(
        "Local FluxPriorReduxPipeline folder: model_index.json, image_encoder (SigLIP), "
        "feature_extractor and image_embedder. Never fetched."))
    embedded: Literal["tiny-flux-redux"] | None = Field(None, description=(
        "Build and use the embedded random-weight Redux of the tiny FLUX."))
    downsampling: int = Field(1, ge=1, le=9, description=(
        "How far the picture's grid of tokens is averaged down when the request does not "
        "say (its `redux_downsampling`): by 1, all of them (27x27 = 729 for the real "
        "encoder); by 3, 9x9 = 81 tokens, which weigh less against the prompt's."))

    def check_files(self, where: str) -> None:
        """Raise ConfigError naming `where`.path unless it is a FluxPriorReduxPipeline
        folder."""
        if self.path is None:
            return
        index = self.path / "model_index.json"
        try:
            name = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            name = None
        if name != "FluxPriorReduxPipeline":
            raise ConfigError(f"{where}.path: {self.path} is not a FLUX.1 Redux folder (its "
                              "model_index.json does not name FluxPriorReduxPipeline)")


class DepthEstimatorConfig(PathOrEmbedded):
    """The depth estimator of a FLUX.1 Depth model: a transformers depth-estimation folder
    (Depth Anything, as Black Forest Labs made FLUX.1 Depth [dev]'s control maps with;
    AutoModelForDepthEstimation and its image processor), run on the replica's device on
    each request's image before its call."""

    path: Path | None = Field(None, description=(
        "Local folder: config.json, preprocessor_config.json and safetensors weights (e.g. "
        "a copy of LiheYoung/depth-anything-large-hf). Never fetched."))
    embedded: Literal["tiny-depth-anything"] | None = Field(None, description=(
        "Build and use the embedded random-weight Depth Anything."))

    def check_files(self, where: str) -> None:
        """Raise ConfigError naming `where`.path unless it holds a model and its image
        processor."""
        for name in ("config.json", "preprocessor_config.json") if self.path else ():
            if not (self.path / name).is_file():
                raise ConfigError(f"{where}.path: {self.path} holds no {name} (a transformers "
                                  "depth-estimation folder)")
