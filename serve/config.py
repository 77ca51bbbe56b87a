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

from serve.auth import ApiKeyConfig
from serve.model_parts import (  # re-exported: importers keep using serve.config
    FAMILIES,
    FLUX_TOOLS,
    SCHEDULERS,
    BatchingConfig,
    ConfigError,
    ContentCredentialsConfig,
    DefaultsConfig,
    Family,
    LimitsConfig,
    PathOrEmbedded,
    RefinerConfig,
    SafetyCheckerConfig,
    SpeedConfig,
    WatermarkConfig,
    _Strict,
    check_flux_kind,
    check_pipeline,
)
from serve.steering import (
    EMBEDDED_CONTROLNETS,
    ControlNetConfig,
    DepthEstimatorConfig,
    IPAdapterConfig,
    ReduxConfig,
)
from serve.webhooks import check_secret

__all__ = ["FAMILIES", "SCHEDULERS", "AtelierConfig", "BatchingConfig", "ConfigError",
           "DefaultsConfig", "Family", "LimitsConfig", "LoraFolderConfig", "ModelConfig",
           "SpeedConfig", "default_config", "load_config", "parse_config"]

MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$")
DEFAULT_MODEL_ID = "atelier/tiny-sdxl"
DEFAULT_FLUX_ID = "atelier/tiny-flux"


class ModelConfig(_Strict):
    id: str = Field(description="Public model id in owner/name form, e.g. atelier/tiny-sdxl.")
    aliases: list[str] = Field(default_factory=list, description=(
        "Other ids that resolve to this model (e.g. stability-ai/sdxl)."))
    family: Literal["sdxl", "flux"] = Field("sdxl", description=(
        "Pipeline family of the weights: sdxl (StableDiffusionXLPipeline) or flux "
        "(FluxPipeline, FLUX.1 dev or schnell)."))
    path: Path | None = Field(None, description=(
        "Local diffusers-format folder (safetensors weights), or a single-file checkpoint "
        "(`.safetensors`, as fine-tunes are shared: for sdxl the whole pipeline in the "
        "original layout, for flux the transformer in Black Forest Labs' layout) read with "
        "`configs_from`. Never fetched."))
    configs_from: Path | None = Field(None, description=(
        "With a single-file `path`: a diffusers folder of the same architecture (e.g. "
        "stable-diffusion-xl-base-1.0, FLUX.1-dev) whose configs, tokenizers and scheduler "
        "go with the file's weights; for flux also its text encoders and VAE (its "
        "transformer's weights are not read), for sdxl none of its weights. The file is "
        "converted once into the cache, so later starts load a diffusers folder."))
    embedded: Literal["tiny-sdxl", "tiny-flux", "tiny-flux-kontext", "tiny-flux-fill",
                      "tiny-flux-canny", "tiny-flux-depth"] | None = Field(None, description=(
        "Build and serve an embedded random-weight model of the family (tiny-flux-kontext, "
        "-fill, -canny, -depth: with `kontext`, `fill`, `canny`, `depth`) instead of "
        "`path`."))
    kontext: bool = Field(False, description=(
        "flux only: the weights are FLUX.1 Kontext (FluxKontextPipeline): a request's input "
        "image is a reference that the prompt edits by instruction (\"make the sky red\"), "
        "with no prompt strength (with a mask: only its white part). Requests without an "
        "image are text-to-image."))
    fill: bool = Field(False, description=(
        "flux only: the weights are FLUX.1 Fill (FluxFillPipeline), made for inpainting and "
        "outpainting: every request sends an image and a mask (or an image whose "
        "transparent part is to be filled), and the mask's white part is drawn anew to fit "
        "the prompt and the rest of the image, with no prompt strength. No text-to-image."))
    canny: bool = Field(False, description=(
        "flux only: the weights are FLUX.1 Canny (FluxControlPipeline): every request sends "
        "an image, whose Canny edges (found here) the output follows while the prompt says "
        "what to draw. No text-to-image."))
    depth: bool = Field(False, description=(
        "flux only: the weights are FLUX.1 Depth (FluxControlPipeline): every request sends "
        "an image, whose depth map (estimated here by `depth_estimator`) lays out the "
        "output while the prompt says what to draw. No text-to-image."))
    depth_estimator: DepthEstimatorConfig | None = Field(None, description=(
        "With `depth`: the model that estimates a request's depth map (required)."))
    variant: str | None = Field(None, description=(
        "Weights file variant in the folder, e.g. fp16 for *.fp16.safetensors."))
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float16", description=(
        "Weights and compute dtype on GPU (CPU always computes in float32)."))
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description=(
        "auto: one GPU per replica when the Ray cluster has GPUs as the app is built, "
        "else CPU; cuda: always one GPU per replica."))
    replicas: int = Field(1, ge=1, le=1024, description="Number of replicas (one per GPU).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    max_ongoing_requests: int = Field(16, ge=1, description=(
        "Requests a replica holds at once (queued in its batcher or running)."))
    max_queued_requests: int = Field(64, ge=0, description=(
        "Requests waiting for a replica before new ones get 503."))
    max_loaded_adapters: int = Field(8, ge=1, le=256, description=(
        "LoRA slots per replica: adapters held at once (the least recently used makes "
        "room), and the most distinct adapters the requests of one call may name."))
    max_lora_rank: int = Field(64, ge=1, le=1024, description=(
        "Rank of each LoRA slot; adapters of higher rank are refused."))
    lora_targets: list[str] = Field(min_length=1, description=(
        "Denoiser modules (name suffixes) that LoRA slots cover. Default per family: the "
        "attention projections (sdxl); every linear layer of the transformer blocks "
        "(flux)."))
    fuse_adapters: bool = Field(False, description=(
        "Merge a call's LoRA adapters into the denoiser's weights (restored exactly from a "
        "copy when the set changes) instead of running LoRA slots beside them: calls with "
        "adapters compute only the base model's layers, but each call serves one adapter "
        "set (slots let requests with different sets share a call). Costs a device copy of the "
        "targeted weights (SDXL attention projections: 1.9 GB in fp16; FLUX.1-dev's 17 "
        "targets: 23.7 GB in bf16) and a weight rewrite each time a replica's adapter set "
        "changes."))
    refiner: RefinerConfig | None = Field(None, description=(
        "SDXL only: a refiner for the `refine` request input (expert_ensemble_refiner, "
        "base_image_refiner). Unset: requests asking for refinement get 422."))
    controlnets: dict[str, ControlNetConfig] = Field(default_factory=dict, description=(
        "SDXL and plain FLUX models: ControlNets by the name requests give (`controlnet`), "
        "e.g. {canny: {path: ...}}. A request with a `control_image` and no name uses the "
        "first."))
    ip_adapter: IPAdapterConfig | None = Field(None, description=(
        "SDXL only: an IP-Adapter, for requests' image prompts (`ip_adapter_image`). Unset: "
        "requests with one get 422."))
    redux: ReduxConfig | None = Field(None, description=(
        "FLUX only: FLUX.1 Redux, for requests' image prompts (`redux_image`): variations "
        "of a picture, restyled by the prompt if one is sent. Unset: requests with one get "
        "422."))
    safety_checker: SafetyCheckerConfig | None = Field(None, description=(
        "Check every output image for NSFW content and withhold the flagged ones (see "
        "SafetyCheckerConfig). Unset: no check."))
    label_images: bool = Field(True, description=(
        "Say in each image's XMP metadata that a trained model generated it (IPTC digital "
        "source type trainedAlgorithmicMedia) and which (xmp:CreatorTool), and sign it with "
        "content_credentials when set, as the EU AI Act's Article 50 asks of generated "
        "images; the pixels are the same either way."))
    watermark: WatermarkConfig | None = Field(default_factory=WatermarkConfig, description=(
        "Mark every image with the family's invisible watermark (see WatermarkConfig); null: "
        "no mark, the pixels are the pipeline's."))
    warmup_steps: int = Field(2, ge=1, le=50, description="Steps of the start-up warm-up call.")
    keep_warm_s: float | None = Field(None, gt=0, description=(
        "When set, a replica that has had no request for this many seconds runs a one-step "
        "call of the default size (and again after each such spell), so that the next "
        "request finds the device as warm as under load. Unset: idle replicas do nothing."))
    health_check_period_s: float = Field(10, gt=0, description=(
        "How often Serve calls the replica's health check."))
    health_check_timeout_s: float = Field(30, gt=0, description=(
        "A health check slower than this counts as failed."))
    health_stall_s: float = Field(600, gt=0, description=(
        "A pipeline call running longer than this marks the replica unhealthy."))
    request_timeout_s: float = Field(300, gt=0, description=(
        "Longest a synchronous request (/generate, OpenAI) may take, queue included: past "
        "it the client gets 504 and the request leaves its batch. Predictions use "
        "Cancel-After instead."))
    simulate_oom_above_images: int | None = Field(None, ge=1, description=(
        "Fault drill: pipeline calls of more images than this raise the device's "
        "out-of-memory error, as a full GPU would, to rehearse the split-and-retry path. "
        "Leave unset in production."))
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)

    @model_validator(mode="before")
    @classmethod
    def _family_lora_targets(cls, data: Any) -> Any:
        if isinstance(data, dict) and "lora_targets" not in data:
            family = data.get("family", "sdxl")
            # An unknown family is reported on its own field.
            rules = FAMILIES.get(family if isinstance(family, str) else "", FAMILIES["sdxl"])
            data = {**data, "lora_targets": list(rules.lora_targets)}
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        for name in (self.id, *self.aliases):
            if not MODEL_ID.match(name):
                raise ValueError(f"model id {name!r} is not in lowercase owner/name form")
        if (self.path is None) == (self.embedded is None):
            raise ValueError("set exactly one of path or embedded")
        tools = [name for name in FLUX_TOOLS if getattr(self, name)]
        if tools and self.family != "flux":
            raise ValueError(f"{tools[0]}: only flux models are {tools[0].title()} models")
        if len(tools) > 1:
            raise ValueError(f"{tools[1]}: a model is one FLUX.1 tool, not "
                             f"{' and '.join(tools)}")
        if self.embedded not in (None, self.rules.embedded):
            kind = f"{self.family}{f' {self.flux_kind.title()}' if self.flux_kind else ''} model"
            hint = {f"tiny-flux-{tool}": f"; set {tool}: true" for tool in FLUX_TOOLS
                    }.get(self.embedded or "", "")
            raise ValueError(f"embedded {self.embedded!r} is not a {kind}{hint}")
        if self.configs_from is not None and self.path is None:
            raise ValueError("configs_from: only a single-file path takes it")
        if self.configs_from is not None and self.variant is not None:
            raise ValueError("variant: a single-file checkpoint has no variants")
        if self.refiner is not None and self.family != "sdxl":
            raise ValueError("refiner: only sdxl models take a refiner")
        self._check_controlnets()
        if self.ip_adapter is not None and self.family != "sdxl":
            raise ValueError("ip_adapter: only sdxl models take an IP-Adapter")
        if self.depth != (self.depth_estimator is not None):
            raise ValueError("depth_estimator: a Depth model needs one, and only a Depth "
                             "model takes one")
        if self.redux is not None and (self.family != "flux" or self.kontext or self.canny
                                       or self.depth):
            raise ValueError("redux: only flux models (plain or Fill; not Kontext, Canny or "
                             "Depth) take FLUX.1 Redux")
        if self.speed.cfg_cutoff is not None and self.family != "sdxl":
            raise ValueError("speed.cfg_cutoff: only sdxl models use classifier-free guidance")
        self.defaults.check_within(self.limits, self.rules)
        if self.limits.max_loras > self.max_loaded_adapters:
            raise ValueError("limits.max_loras must not exceed max_loaded_adapters")
        buckets = self.speed.batch_buckets
        if buckets and buckets[-1] < self.batching.max_batch_size:
            raise ValueError("speed.batch_buckets must hold batching.max_batch_size")
        if self.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError("max_ongoing_requests must be at least batching.max_batch_size, "
                             "or batches can never fill")
        return self

    def _check_controlnets(self) -> None:
        if self.controlnets and self.flux_kind:
            raise ValueError(f"controlnets: a FLUX.1 {self.flux_kind.title()} model takes no "
                             "ControlNets (plain FLUX models do)")
        for name, net in self.controlnets.items():
            family = net.embedded and EMBEDDED_CONTROLNETS[net.embedded][0]
            if family not in (None, self.family):
                raise ValueError(f"controlnets.{name}.embedded: {net.embedded!r} is a {family} "
                                 f"ControlNet, and this is a {self.family} model")

    @property
    def flux_kind(self) -> Literal["kontext", "fill", "canny", "depth"] | None:
        """Which FLUX.1 tool the weights are, if one."""
        return next((tool for tool in FLUX_TOOLS if getattr(self, tool)), None)

    @property
    def image_prompt_field(self) -> str:
        """The request field of the model's image prompts: an SDXL model's IP-Adapter reads
        ip_adapter_image, a FLUX model's Redux redux_image."""
        return "redux_image" if self.family == "flux" else "ip_adapter_image"

    @property
    def rules(self) -> Family:
        return FLUX_TOOLS[self.flux_kind] if self.flux_kind else FAMILIES[self.family]

    @property
    def default_scheduler(self) -> str:
        return self.defaults.scheduler or self.rules.schedulers[0]

    @property
    def slug(self) -> str:
        """A name usable as a Serve deployment name."""
        return re.sub(r"[^a-z0-9-]", "-", self.id)


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
    webhook_secret: str | None = Field(None, repr=False, description=(
        "Secret that signs webhooks (whsec_ + base64 of 24-64 bytes), also settable as "
        "ATELIER_WEBHOOK_SECRET. Unset: one is made and kept in the store (Redis: shared "
        "and kept; memory: until the ingress restarts). GET /v1/webhooks/default/secret."))
    image_allowed_hosts: list[str] = Field(default_factory=list, description=(
        "Hosts (or host:port) that input images may be fetched from when a request gives "
        "an http(s) URL; none by default (send data URIs or base64)."))
    redis_url: str | None = Field(None, description=(
        "Keep predictions and files in Redis (e.g. redis://host:6379/0), shared by every "
        "ingress replica; default: in the ingress replica's memory."))
    file_ttl_s: float = Field(3600, gt=0, description=(
        "How long predictions and generated files are kept."))
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

    @field_validator("webhook_secret")
    @classmethod
    def _signing_secret(cls, value: str | None) -> str | None:
        return value if value is None else check_secret(value)

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
    def _unique_ids(self) -> AtelierConfig:
        seen: set[str] = set()
        for model in self.models:
            for name in (model.id, *model.aliases):
                if name in seen:
                    raise ValueError(f"model id or alias {name!r} is used twice")
                seen.add(name)
        return self

    def check_paths(self) -> None:
        """Raise ConfigError naming the field of each model path that does not exist or
        does not hold what its field reads."""
        for i, model in enumerate(self.models):
            refiner, checker = model.refiner, model.safety_checker
            check_pipeline(f"models.{i}", "", model.path, model.configs_from, model.family)
            check_flux_kind(f"models.{i}", model.path, model.configs_from, model.flux_kind)
            check_pipeline(f"models.{i}", "refiner.", refiner and refiner.path,
                           refiner and refiner.configs_from, "sdxl-refiner")
            for name, net in model.controlnets.items():
                net.check_files(f"models.{i}.controlnets.{name}", model.family)
            if model.ip_adapter is not None:
                model.ip_adapter.check_files(f"models.{i}.ip_adapter")
            if model.redux is not None:
                model.redux.check_files(f"models.{i}.redux")
            if model.depth_estimator is not None:
                model.depth_estimator.check_files(f"models.{i}.depth_estimator")
            if checker is not None and not checker.path.exists():
                raise ConfigError(f"models.{i}.safety_checker.path: {checker.path} does not "
                                  "exist")
            for name in ("config.json", "preprocessor_config.json") if checker else ():
                if not (checker.path / name).is_file():
                    raise ConfigError(f"models.{i}.safety_checker.path: {checker.path} holds "
                                      f"no {name} (a StableDiffusionSafetyChecker folder)")
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


def default_config() -> AtelierConfig:
    """The embedded default: a tiny random-weight SDXL (with a refiner, a Canny ControlNet
    and an IP-Adapter) and a tiny random-weight FLUX (with FLUX.1 Redux, and a union
    ControlNet serving canny and depth), sized for a laptop CPU (the machine's CPUs shared
    between the two)."""
    cpus = max(1, min(4, (os.cpu_count() or 1) // 2))
    limits = LimitsConfig(max_size=1024, max_pixels=1024 * 1024)
    return AtelierConfig(models=[
        ModelConfig(id=DEFAULT_MODEL_ID, aliases=["stability-ai/sdxl"], embedded="tiny-sdxl",
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
                                                           control_mode=2)},
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
