"""Typed configuration: which base models to serve and how.

Loaded from YAML (or built in code for the embedded default). Every invalid value fails at
start with `ConfigError`, whose message names the field path (e.g. `models.0.dtype`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from serve.auth import ApiKeyConfig, configured_keys, webhook_secrets
from serve.folders import check_model_files
from serve.model_config import ModelConfig
from serve.model_extras import ContentCredentialsConfig, RefinerConfig
from serve.model_parts import (  # re-exported: importers keep using serve.config
    FAMILIES,
    SCHEDULERS,
    BatchingConfig,
    ConfigError,
    DefaultsConfig,
    Family,
    LimitsConfig,
    PathOrEmbedded,
    SpeedConfig,
    _Strict,
)
from serve.steering import (
    ControlNetConfig,
    DepthEstimatorConfig,
    IPAdapterConfig,
    ReduxConfig,
)
from serve.webhooks import SigningSecret

__all__ = ["FAMILIES", "OPENAI_IMAGE_MODELS", "SCHEDULERS", "AtelierConfig", "BatchingConfig",
           "ConfigError", "DefaultsConfig", "Family", "LimitsConfig", "LoraFolderConfig",
           "ModelConfig", "SpeedConfig", "default_config", "load_config", "parse_config"]

DEFAULT_MODEL_ID = "atelier/tiny-sdxl"
DEFAULT_FLUX_ID = "atelier/tiny-flux"
# OpenAI's image models, as its clients name them: the default config serves them all with
# its SDXL, so code written for OpenAI runs unchanged, its `model` argument included.
OPENAI_IMAGE_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini",
                       "gpt-image-1.5", "gpt-image-2")


class LoraFolderConfig(PathOrEmbedded):
    path: Path | None = Field(None, description=(
        "Folder of <name>.safetensors LoRA files (diffusers/PEFT or kohya key layout)."))
    embedded: Literal["tiny-sdxl-demo", "tiny-flux-demo"] | None = Field(None, description=(
        "Build and use the demo adapters of an embedded tiny model instead of `path`."))
    base: str = Field(description="Model id, alias or family (e.g. sdxl) the adapters fit.")
    default_scale: float = Field(1.0, ge=-4, le=4, description=(
        "Scale when a request names an adapter without one."))


class AtelierConfig(_Strict):
    models: list[ModelConfig] = Field(min_length=1, description="Base models to serve.")
    cache_dir: Path = Field(default_factory=lambda: default_cache_dir(), description=(
        "Where embedded models are built."))
    lora_folders: list[LoraFolderConfig] = Field(default_factory=list, description=(
        "Folders whose LoRA adapters form the catalog that requests may name."))
    lora_allowed_hosts: list[str] = Field(default_factory=list, description=(
        "Hosts (host, host:port, or *.domain) that LoRA files may be downloaded from when a "
        "request gives a URL instead of a catalog name (Replicate's lora_weights); none by "
        "default. Redirects are followed only to listed hosts (for Hugging Face: "
        "huggingface.co and *.hf.co)."))
    lora_download_max_mb: int = Field(2048, ge=1, description=(
        "Largest LoRA file a replica downloads, in megabytes."))
    lora_download_cache_mb: int = Field(20480, ge=1, description=(
        "Megabytes of downloaded LoRA files a node keeps; past it the least recently used "
        "files are deleted (and downloaded again when needed)."))
    api_keys: list[str | ApiKeyConfig] = Field(default_factory=list, repr=False, description=(
        "Keys clients must send as `Authorization: Bearer <key>` (or `Token <key>`), each a "
        "string or {key, name, requests_per_minute, images_per_minute}; ATELIER_API_KEYS "
        "(comma-separated) adds more. None: the server is open."))
    webhook_allowed_hosts: list[str] = Field(default_factory=list, description=(
        "Hosts (or host:port) that prediction webhooks may be sent to; none by default."))
    webhook_secret: SigningSecret | None = Field(None, repr=False, description=(
        "Secret that signs webhooks (whsec_ + base64 of 24-64 bytes), also settable as "
        "ATELIER_WEBHOOK_SECRET. Unset: one is made and kept in the store (Redis: shared "
        "and kept; memory: until the ingress restarts). With API keys, each key's secret is "
        "derived from it and its name (unless the key sets webhook_secret). "
        "GET /v1/webhooks/default/secret."))
    image_allowed_hosts: list[str] = Field(default_factory=list, description=(
        "Hosts (or host:port) that input images may be fetched from when a request gives "
        "an http(s) URL; none by default (send data URIs or base64)."))
    redis_url: str | None = Field(None, description=(
        "Keep predictions and files in Redis (e.g. redis://host:6379/0), shared by every "
        "ingress replica; default: in the ingress replica's memory."))
    file_ttl_s: float = Field(3600, gt=0, description=(
        "How long predictions and generated files are kept."))
    max_unfinished_predictions: int = Field(1000, ge=1, description=(
        "Predictions one ingress replica runs at once, from acceptance to their end "
        "(waiting for a GPU or generating); past it a create is refused with 503 and "
        "Retry-After. A key's own max_unfinished_predictions bounds its share (429)."))
    prediction_retry_s: float = Field(600, ge=0, description=(
        "How long an accepted prediction keeps retrying, with back-off, while its model is "
        "full or the replica running it was lost (then it fails)."))
    file_store_mb: int = Field(1024, ge=1, description=(
        "Most megabytes of generated files an ingress replica keeps (oldest go first)."))
    ingress_replicas: int = Field(1, ge=1, description=(
        "Replicas of the CPU-only ingress; more than one needs redis_url, so that they "
        "share predictions and files."))
    max_body_bytes: int = Field(64 * 2**20, ge=1024, description=(
        "Largest HTTP request body; over it: 413 before the body is read (base64 images "
        "are a third larger than their files)."))
    content_credentials: ContentCredentialsConfig | None = Field(None, description=(
        "Sign every labeled image (models' label_images) with a C2PA manifest; unset: "
        "the XMP label alone."))
    cors_allowed_origins: list[str] = Field(default_factory=list, description=(
        "Origins (scheme://host[:port]) whose browser apps may call the APIs, or \"*\" "
        "for any; none by default. API keys are still needed."))
    ingress_max_ongoing_requests: int = Field(1024, ge=1, description=(
        "HTTP requests one ingress replica holds at once (it mostly awaits the models)."))

    @field_validator("cors_allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:  # as browsers send Origin: no path, not even a trailing "/"
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"cors_allowed_origins: {origin!r} is not an origin: give "
                                 "scheme://host[:port], without a path, or \"*\"")
        return value

    @model_validator(mode="after")
    def _shared_state(self) -> AtelierConfig:
        if self.ingress_replicas > 1 and self.redis_url is None:
            raise ValueError("ingress_replicas > 1 needs redis_url, or predictions made "
                             "through one replica are unknown to the others")
        return self

    @model_validator(mode="after")
    def _image_rates_hold_a_request(self) -> AtelierConfig:
        most = max((m.limits.max_outputs for m in self.models), default=1)
        for key in self.api_keys:
            rate = getattr(key, "images_per_minute", None)
            if rate is not None and rate < most:
                raise ValueError(f"api key {key.name or '(unnamed)'}: images_per_minute {rate} "
                                 f"is below the {most} images one request may ask for "
                                 "(limits.max_outputs), which it could then never send")
        return self

    @model_validator(mode="after")
    def _one_webhook_secret_per_key_name(self) -> AtelierConfig:
        webhook_secrets(configured_keys(self.api_keys))
        return self

    @model_validator(mode="after")
    def _keys_name_served_models(self) -> AtelierConfig:
        served = {name for m in self.models for name in m.names}
        for i, key in enumerate(self.api_keys):
            unknown = [n for n in getattr(key, "models", None) or () if n not in served]
            if unknown:
                raise ValueError(f"api_keys.{i}.models: {unknown[0]!r} is not a served model "
                                 "id or alias")
        return self

    @model_validator(mode="after")
    def _unique_ids(self) -> AtelierConfig:
        seen: set[str] = set()
        for model in self.models:
            for name in model.names:
                if name in seen:
                    raise ValueError(f"model id or alias {name!r} is used twice")
                seen.add(name)
            for version in model.pinned_versions:
                if version in seen:
                    raise ValueError(f"replicate_versions: version {version} is pinned twice")
                seen.add(version)
        return self

    def check_paths(self) -> None:
        """Raise ConfigError naming the field of each model path that does not exist or
        does not hold what its field reads."""
        for i, model in enumerate(self.models):
            check_model_files(model, f"models.{i}")
        signing = self.content_credentials
        for field in ("certificate", "private_key") if signing else ():
            if not getattr(signing, field).is_file():
                raise ConfigError(f"content_credentials.{field}: {getattr(signing, field)} "
                                  "is not a file")
        for i, folder in enumerate(self.lora_folders):
            if folder.path is not None and not folder.path.is_dir():
                raise ConfigError(f"lora_folders.{i}.path: {folder.path} is not a folder")


def default_cache_dir() -> Path:
    env = os.environ.get("ATELIER_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "atelier"


# The version of stability-ai/sdxl that Replicate's examples and client code pin.
REPLICATE_SDXL = "stability-ai/sdxl:39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b"


def default_config() -> AtelierConfig:
    """The embedded default: a tiny random-weight SDXL (with a refiner, a Canny ControlNet
    and an IP-Adapter) and a tiny random-weight FLUX (with FLUX.1 Redux, and a union
    ControlNet serving canny and depth, each from a picture), sized for a laptop CPU (the
    machine's CPUs shared between the two)."""
    cpus = max(1, min(4, (os.cpu_count() or 1) // 2))
    limits = LimitsConfig(max_size=1024, max_pixels=1024 * 1024)
    return AtelierConfig(models=[
        ModelConfig(id=DEFAULT_MODEL_ID, aliases=["stability-ai/sdxl", *OPENAI_IMAGE_MODELS],
                    embedded="tiny-sdxl", replicate_versions=[REPLICATE_SDXL],
                    refiner=RefinerConfig(embedded="tiny-sdxl-refiner"),
                    controlnets={"canny": ControlNetConfig(embedded="tiny-sdxl-controlnet",
                                                           preprocess="canny")},
                    ip_adapter=IPAdapterConfig(embedded="tiny-sdxl-ip-adapter"),
                    dtype="float32", num_cpus=cpus, limits=limits,
                    defaults=DefaultsConfig(width=512, height=512, num_inference_steps=20)),
        ModelConfig(id=DEFAULT_FLUX_ID, aliases=["black-forest-labs/flux-dev"], family="flux",
                    embedded="tiny-flux", redux=ReduxConfig(embedded="tiny-flux-redux"),
                    controlnets={"canny": ControlNetConfig(embedded="tiny-flux-controlnet",
                                                           preprocess="canny", control_mode=0),
                                 "depth": ControlNetConfig(embedded="tiny-flux-controlnet",
                                                           preprocess="depth", control_mode=2)},
                    depth_estimator=DepthEstimatorConfig(embedded="tiny-depth-anything"),
                    dtype="float32", num_cpus=cpus, limits=limits,
                    defaults=DefaultsConfig(width=512, height=512, num_inference_steps=28,
                                            guidance_scale=3))],
        lora_folders=[LoraFolderConfig(embedded="tiny-sdxl-demo", base="sdxl"),
                      LoraFolderConfig(embedded="tiny-flux-demo", base="flux")])


def parse_config(data: Any) -> AtelierConfig:
    """Validate a config mapping; raise ConfigError naming every failing field."""
    try:
        return AtelierConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"]) or "config"
            lines.append(f"{where}: {err['msg']}")
        raise ConfigError("invalid Atelier config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path | None) -> AtelierConfig:
    """Read a YAML config file; None gives the embedded default."""
    if path is None:
        return default_config()
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    return parse_config(data)


def app_config(args: dict[str, Any]) -> AtelierConfig:
    """The config an Atelier application's Serve `args` give: `atelier` (a mapping, inline),
    else `config` (a YAML path), else the embedded default. Raises ConfigError."""
    if "atelier" in args:
        return parse_config(args["atelier"])
    return load_config(args.get("config"))
