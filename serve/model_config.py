"""A served model's configuration: which weights, their family and FLUX.1 tool, what steers
them (ControlNets, IP-Adapter, Redux), its replicas, adapters, batching, speed, limits and
defaults, each value checked when the config is read (`serve.config` reads the whole
file)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from serve.model_checks import check_names, check_parts, check_serving, check_weights
from serve.model_extras import (
    FreeUConfig,
    MergedLoraConfig,
    PromptConfig,
    RefinerConfig,
    SafetyCheckerConfig,
    StyleConfig,
    TextualInversionConfig,
    UpscalerConfig,
    WatermarkConfig,
)
from serve.model_parts import (
    FAMILIES,
    FLUX_TOOLS,
    SDXL_INPAINTING,
    ZERO_SNR_SCHEDULERS,
    AutoscalingConfig,
    BatchingConfig,
    DefaultsConfig,
    Family,
    LimitsConfig,
    SchedulerOptions,
    SpeedConfig,
    _Strict,
)
from serve.steering import (
    ControlNetConfig,
    DepthEstimatorConfig,
    ExtraIPAdapterConfig,
    IPAdapterConfig,
    ReduxConfig,
)


class ModelConfig(_Strict):
    id: str = Field(description="Public model id in owner/name form, e.g. atelier/tiny-sdxl.")
    aliases: list[str] = Field(default_factory=list, description=(
        "Other names that resolve to this model: owner/name ids (e.g. stability-ai/sdxl), "
        "or bare names as OpenAI's clients send them (e.g. dall-e-3, gpt-image-1), which "
        "only a model field can name (Replicate's routes take owner/name)."))
    upscaling_aliases: list[str] = Field(default_factory=list, description=(
        "Ids (e.g. nightmareai/real-esrgan) under which Replicate predictions take "
        "real-esrgan's inputs (image, scale) and answer the image enlarged by this "
        "model's first upscaler, not redrawn, as one URL. Needs an upscaler."))
    replicate_versions: list[str] = Field(default_factory=list, description=(
        "Replicate versions that client code pins, as owner/name:version (e.g. "
        "stability-ai/sdxl:7762fd07...): predictions of them run on this model unchanged, "
        "the name being the model's id, an alias or an upscaling alias. Answers report the "
        "version served here (the one that pins these weights)."))
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
    embedded: Literal["tiny-sdxl", "tiny-sdxl-inpainting", "tiny-flux", "tiny-flux-kontext",
                      "tiny-flux-fill", "tiny-flux-canny", "tiny-flux-depth"] | None = Field(
        None, description=(
            "Build and serve an embedded random-weight model of the family "
            "(tiny-sdxl-inpainting: with `inpainting`; tiny-flux-kontext, -fill, -canny, "
            "-depth: with `kontext`, `fill`, `canny`, `depth`) instead of `path`."))
    inpainting: bool = Field(False, description=(
        "sdxl only: the UNet is an inpainting one (9 input channels: noise, mask, masked "
        "image), as diffusers/stable-diffusion-xl-1.0-inpainting-0.1 and the inpainting "
        "versions of fine-tunes are. Every request runs as inpainting: a mask's white part "
        "is repainted, an image without a mask is repainted whole at its prompt strength, "
        "and text-to-image repaints a blank image whole."))
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
        "The model that estimates depth maps from requests' pictures: required with "
        "`depth` and with ControlNets that `preprocess: depth`, refused elsewhere."))
    variant: str | None = Field(None, description=(
        "Weights file variant in the folder, e.g. fp16 for *.fp16.safetensors."))
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float16", description=(
        "Weights and compute dtype on GPU (CPU always computes in float32)."))
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description=(
        "auto: one GPU per replica when the Ray cluster has GPUs as the app is built, "
        "else CPU; cuda: always one GPU per replica."))
    replicas: int = Field(1, ge=1, le=1024, description=(
        "Number of replicas (one per GPU, or per `gpu_share` of one)."))
    autoscaling: AutoscalingConfig | None = Field(None, description=(
        "Replicas that follow demand, between autoscaling.min_replicas and max_replicas "
        "(Ray Serve's autoscaling), instead of a fixed number (then leave replicas unset)."))
    gpu_share: float = Field(1.0, gt=0, le=1, description=(
        "The share of a GPU each replica takes (Ray's num_gpus): 0.5 lets two replicas, of "
        "this model or of others with shares that fit, run on one GPU (e.g. several SDXL "
        "fine-tunes on a 96 GB card). Each keeps to that share of the GPU's memory; they "
        "take turns at its compute."))
    accelerator_type: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                         description=(
        "Places the replicas only on servers with this type of GPU, as Ray names it "
        "(RTX-PRO-6000, H100, L40S, A100 ...; `ray list nodes --detail` shows each "
        "server's), e.g. a FLUX model on the 96 GB cards of a mixed cluster. Unset: any "
        "GPU. `GET /v1/hardware` lists the cluster's."))
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    max_ongoing_requests: int = Field(16, ge=1, description=(
        "Requests a replica holds at once (queued in its batcher or running)."))
    max_queued_requests: int = Field(64, ge=0, description=(
        "Requests waiting (at each ingress replica, by priority) for a place on the "
        "replicas before new ones get 503; a newcomer of higher priority takes the place "
        "of the newest of the lowest waiting instead."))
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
    vae: Path | None = Field(None, description=(
        "A local diffusers AutoencoderKL folder (config.json, safetensors weights) that "
        "replaces the checkpoint's VAE, e.g. madebyollin/sdxl-vae-fp16-fix (decodes in "
        "float16 without SDXL's float32 upcast) or a fine-tune's recommended VAE. Its "
        "latent channels must be the family's (sdxl 4, flux 16). Never fetched."))
    merged_loras: list[MergedLoraConfig] = Field(default_factory=list, description=(
        "LoRA files merged into the weights at load, for every request (e.g. "
        "SDXL-Lightning's 4-step LoRA on a base checkpoint); in order."))
    freeu: FreeUConfig | None = Field(None, description=(
        "SDXL only: FreeU's re-weighting of the UNet decoder's features for every request "
        "(`{}` takes the FreeU authors' SDXL values). Changes the images."))
    styles: dict[str, StyleConfig] = Field(default_factory=dict, description=(
        "Named styles requests may ask for (`style` on /generate and Replicate's input; "
        "OpenAI's own `style`), e.g. {cinematic: {prompt: 'cinematic still of {prompt}'}}."))
    prompts: PromptConfig = Field(default_factory=PromptConfig, description=(
        "SDXL only: prompts longer than CLIP's 77 tokens and weighted words (see "
        "PromptConfig). Unset: read as diffusers reads them."))
    textual_inversions: list[TextualInversionConfig] = Field(
        default_factory=list, description=(
            "SDXL only: textual-inversion embeddings loaded at start, each a new word "
            "prompts may use."))
    refiner: RefinerConfig | None = Field(None, description=(
        "SDXL only: a refiner for the `refine` request input (expert_ensemble_refiner, "
        "base_image_refiner). Unset: requests asking for refinement get 422."))
    vae_tiling: bool = Field(False, description=(
        "Decode and encode images larger than the VAE's sample size (1024 for SDXL and "
        "FLUX) in overlapping tiles that blend, as diffusers' enable_tiling does, so the "
        "VAE's memory stays that of a 1024² image for hires passes and large inputs. Such "
        "images then differ slightly from whole-image decodes; tiling images (`tiling`) "
        "are decoded whole."))
    upscalers: dict[str, UpscalerConfig] = Field(default_factory=dict, description=(
        "SDXL and plain FLUX models: ESRGAN-family upscalers by the name requests give "
        "(`hires_upscaler`), for the hires pass; its default is the first. Unset: bicubic."))
    controlnets: dict[str, ControlNetConfig] = Field(default_factory=dict, description=(
        "SDXL and plain FLUX models: ControlNets by the name requests give (`controlnet`), "
        "e.g. {canny: {path: ...}}. A request with a `control_image` and no name uses the "
        "first."))
    ip_adapter: IPAdapterConfig | None = Field(None, description=(
        "SDXL and plain FLUX models: an IP-Adapter, for requests' image prompts "
        "(`ip_adapter_image`). Unset: requests with one get 422."))
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
    scheduler_options: SchedulerOptions = Field(default_factory=SchedulerOptions, description=(
        "SDXL only: the schedulers' timestep spacing, prediction type and zero-terminal-SNR "
        "rescaling, over the checkpoint's (few-step models: SDXL-Lightning, Hyper-SD; "
        "v-prediction fine-tunes)."))

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
        check_names(self)
        check_weights(self)
        check_parts(self)
        check_serving(self)
        return self

    @property
    def replica_range(self) -> tuple[int, int]:
        """The fewest and the most replicas the model runs."""
        if self.autoscaling is None:
            return self.replicas, self.replicas
        return self.autoscaling.min_replicas, self.autoscaling.max_replicas

    @property
    def extra_ip_adapters(self) -> dict[str, ExtraIPAdapterConfig]:
        """The further IP-Adapters requests may send image prompts to, by name."""
        return self.ip_adapter.extra if self.ip_adapter is not None else {}

    @property
    def estimates_depth(self) -> bool:
        """Whether the replica estimates depth maps: a Depth model's, or those of its
        ControlNets that `preprocess: depth`."""
        return self.depth or any(net.preprocess == "depth" for net in self.controlnets.values())

    @property
    def flux_kind(self) -> Literal["kontext", "fill", "canny", "depth"] | None:
        """Which FLUX.1 tool the weights are, if one."""
        return next((tool for tool in FLUX_TOOLS if getattr(self, tool)), None)

    @property
    def pinned_versions(self) -> dict[str, str]:
        """Each Replicate version id the model runs under (replicate_versions), with the
        name it pins."""
        return {version: name for name, _, version in
                (ref.rpartition(":") for ref in self.replicate_versions)}

    @property
    def names(self) -> tuple[str, ...]:
        """Every id that resolves to the model: its own, its aliases, its upscaling ones."""
        return (self.id, *self.aliases, *self.upscaling_aliases)

    @property
    def image_prompt_field(self) -> str:
        """The request field of the model's image prompts: an IP-Adapter reads
        ip_adapter_image, a FLUX model's Redux redux_image (and a FLUX model without either
        is said to read none from redux_image)."""
        if self.family == "flux" and self.ip_adapter is None:
            return "redux_image"
        return "ip_adapter_image"

    def options(self) -> dict[str, bool]:
        """Which of the per-request options the model takes: tiling, the hires pass, seed
        variations (those two follow text-to-image, which an inpainting checkpoint never
        runs) and enlarging the finished images (`upscale`)."""
        rules, text = self.rules, "txt2img" in self.rules.modes
        return {"tiling": rules.tiles, "hires": rules.hires and text,
                "variations": rules.variations and text, "upscale": rules.hires}

    @property
    def rules(self) -> Family:
        if self.family == "sdxl":
            rules = SDXL_INPAINTING if self.inpainting else FAMILIES["sdxl"]
            if self.scheduler_options.rescale_betas_zero_snr:
                return replace(rules, schedulers=ZERO_SNR_SCHEDULERS)
            return rules
        return FLUX_TOOLS[self.flux_kind] if self.flux_kind else FAMILIES[self.family]

    @property
    def default_scheduler(self) -> str:
        return self.defaults.scheduler or self.rules.schedulers[0]

    @property
    def slug(self) -> str:
        """A name usable as a Serve deployment name."""
        return re.sub(r"[^a-z0-9-]", "-", self.id)
