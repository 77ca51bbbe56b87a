"""The parts of a model's configuration: pipeline families and what each accepts, the
batching, autoscaling, speed, limits, defaults and scheduler sections (`serve.config`
assembles them; the refiner, upscalers, prompts, styles and output marks are in
`serve.model_extras`, ControlNets and IP-Adapters in `serve.steering`, the checks of what
a model's paths hold in `serve.folders`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Replicate's stability-ai/sdxl scheduler names.
SCHEDULERS = ("K_EULER", "K_EULER_ANCESTRAL", "DDIM", "DPMSolverMultistep", "HeunDiscrete",
              "KarrasDPM", "PNDM", "DPM++2MSDE", "LCM", "DPM++2MSDEKarras", "UniPC", "DEIS")
# Those whose diffusers schedulers can rescale the noise schedule to zero terminal SNR.
ZERO_SNR_SCHEDULERS = tuple(s for s in SCHEDULERS if s not in ("HeunDiscrete", "PNDM", "DEIS"))


@dataclass(frozen=True)
class Family:
    """What a pipeline family accepts."""

    schedulers: tuple[str, ...]  # the first is the default
    size_multiple: int  # width and height must be multiples of this
    negative_prompt: bool
    modes: tuple[str, ...]  # txt2img, img2img, inpaint, edit, control
    embedded: str  # the embedded tiny model of the family
    lora_targets: tuple[str, ...]  # default modules (name suffixes) of the LoRA slots
    needs: str = ""  # without text-to-image: what every request must send
    tiles: bool = False  # draws images that tile (a denoiser of convolutions)
    hires: bool = False  # redraws its text-to-image images larger (a second, img2img pass)
    variations: bool = False  # mixes a variation seed's noise into text-to-image's
    clip_skip: bool = False  # reads prompts from a chosen layer of its CLIP text encoders


# SDXL adapters mostly train the UNet's attention projections. FLUX trainers (ai-toolkit,
# kohya's sd-scripts, diffusers' scripts) train every linear layer of the transformer
# blocks: attention of both streams, feed-forwards, the single blocks' MLP and output, and
# the modulation layers.
_FLUX_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
    "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out", "norm1.linear", "norm1_context.linear", "norm.linear")

FAMILIES = {
    "sdxl": Family(SCHEDULERS, 8, True, ("txt2img", "img2img", "inpaint"), "tiny-sdxl",
                   ("to_q", "to_k", "to_v", "to_out.0"), tiles=True, hires=True,
                   variations=True, clip_skip=True),
    # FLUX latents are packed 2x2, on top of the VAE's factor of 8.
    "flux": Family(("FlowMatchEuler",), 16, False, ("txt2img", "img2img", "inpaint"),
                   "tiny-flux", _FLUX_LORA_TARGETS, hires=True, variations=True),
}
# The FLUX.1 tools, each a FLUX model with its own weights and pipeline. Kontext
# (`kontext: true`): an input image is a reference the prompt edits, not an img2img start;
# with a mask, only its white part is repainted. Fill (`fill: true`): an image and a mask
# always, the mask's white part drawn anew (inpainting, and outpainting past the borders).
# Canny (`canny: true`): an image always, whose Canny edges the output follows. Depth
# (`depth: true`): an image always, whose estimated depth map the output follows.
# Seed variations: Kontext's text-to-image only (FLUX's own pipeline); the other tools
# always start from a request's image. None runs a hires pass.
_FLUX_TOOL = replace(FAMILIES["flux"], variations=False, hires=False)
FLUX_TOOLS = {
    "kontext": replace(_FLUX_TOOL, modes=("txt2img", "edit", "inpaint"),
                       embedded="tiny-flux-kontext", variations=True),
    "fill": replace(_FLUX_TOOL, modes=("inpaint",), embedded="tiny-flux-fill",
                    needs="this model fills the white part of a mask over an image: send an "
                          "image and a mask, or an image whose transparent part is to be "
                          "filled"),
    "canny": replace(_FLUX_TOOL, modes=("control",), embedded="tiny-flux-canny",
                     needs="this model draws what the edges of a control image outline: send "
                           "an image (its Canny edges are found here)"),
    "depth": replace(_FLUX_TOOL, modes=("control",), embedded="tiny-flux-depth",
                     needs="this model draws what the depth of a control image lays out: send "
                           "an image (its depth map is estimated here)"),
}
# SDXL inpainting checkpoints (`inpainting: true`): a UNet that takes the mask and the
# masked image's latents beside the noise. Every call is an inpainting one: text-to-image
# repaints a whole blank image, img2img a whole image at its strength.
SDXL_INPAINTING = replace(FAMILIES["sdxl"], modes=("inpaint",), embedded="tiny-sdxl-inpainting")
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """The configuration is invalid; the message names each failing field."""


class PathOrEmbedded(_Strict):
    """Files from a local `path`, or an `embedded` set built here: exactly one of them."""

    @model_validator(mode="after")
    def _one_source(self) -> PathOrEmbedded:
        if (self.path is None) == (self.embedded is None):
            raise ValueError("set exactly one of path or embedded")
        return self


class BatchingConfig(_Strict):
    max_batch_size: int = Field(4, ge=1, le=64, description=(
        "Most images in one pipeline call (a request with num_outputs=n takes n)."))
    wait_ms: float = Field(20.0, ge=0, le=10_000, description=(
        "How long the oldest waiting request waits for compatible company before its "
        "batch runs anyway."))


class AutoscalingConfig(_Strict):
    """Ray Serve's autoscaling of a model's replicas between `min_replicas` and
    `max_replicas`, by the requests each holds (in its batcher or running, and those
    waiting for one). A replica keeps its weights loaded and warm while it lives; a new
    one serves once it has started up (weights, warm-up, compiled code from the cache)."""

    min_replicas: int = Field(1, ge=1, le=1024, description=(
        "Replicas kept at all times (at least one: a model stays loaded and warm)."))
    max_replicas: int = Field(ge=1, le=1024, description=(
        "Most replicas (each takes a GPU, or its gpu_share of one)."))
    target_ongoing_requests: float | None = Field(None, gt=0, description=(
        "Requests per replica (running, in its batcher, or waiting for a replica) the "
        "autoscaler aims at: more add replicas, fewer remove them. Under the model's "
        "max_ongoing_requests (each replica holds up to that, and the rest wait at the "
        "ingress by priority, so replicas full past the target are what add one). Unset: "
        "twice batching.max_batch_size, one call running and one gathered behind it."))
    upscale_delay_s: float = Field(30.0, ge=0, description=(
        "How long demand stays over the target before replicas are added."))
    downscale_delay_s: float = Field(600.0, ge=0, description=(
        "How long demand stays under the target before replicas are removed: longer than "
        "the lulls between bursts, as a replica's start-up takes a while."))

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self

    def ray_config(self, max_batch_size: int) -> dict:
        """Ray Serve's autoscaling_config for a model whose calls hold `max_batch_size`."""
        target = self.target_ongoing_requests or 2 * max_batch_size
        return {"min_replicas": self.min_replicas, "initial_replicas": self.min_replicas,
                "max_replicas": self.max_replicas, "target_ongoing_requests": target,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s}


class SpeedConfig(_Strict):
    """How the denoiser (SDXL's UNet, FLUX's transformer) is prepared for speed at load.
    All off by default: each trades start-up time or exactness for throughput. `fuse_qkv`
    and `fp8` replace the layers that LoRA adapters change, so a model served with adapters
    cannot use them; `compile` needs the model's `fuse_adapters`."""

    channels_last: bool = Field(False, description=(
        "Store the denoiser's and the VAE's convolution weights channels-last (faster "
        "convolutions on GPU; FLUX's transformer has none)."))
    fuse_qkv: bool = Field(False, description=(
        "Fuse each attention's query, key and value projections into one matrix product."))
    compile: bool = Field(False, description=(
        "torch.compile the denoiser's repeated blocks (SDXL's transformer and resnet blocks, "
        "FLUX's double- and single-stream blocks) and the "
        "VAE decoder's, with dynamic shapes: one compilation serves every batch size and "
        "image size. It happens during the start-up warm-up; the compiled code is kept in "
        "`<cache_dir>/compile`, so a restarted replica reuses it."))
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default", description=(
            "With compile: torch.compile's mode. max-autotune-no-cudagraphs times several "
            "generated kernels against the library's for each matrix product and "
            "convolution of the compiled blocks on the GPU and keeps the fastest; the first "
            "start takes longer, and the choices are kept with the compiled code."))
    fp8: bool = Field(False, description=(
        "Run the denoiser's transformer blocks' linear layers in FP8 (e4m3, one scale per "
        "row of weights and of activations). Needs a GPU with FP8 matrix units (H100, Ada, "
        "Blackwell); images differ slightly from bf16."))
    fp8_scaling: Literal["row", "tensor"] = Field("row", description=(
        "With fp8: one scale per row of weights and of activations (row), or one per "
        "tensor (tensor: the plainest FP8 matrix product, but a row of small activations "
        "beside large ones loses precision)."))
    fp8_fast_accum: bool = Field(True, description=(
        "With fp8: accumulate each matrix product in the FP8 tensor cores' own accumulators "
        "(fast, as FP8 inference usually runs; row-wise products without it run a much "
        "slower kernel) instead of promoting partial sums to float32 every 128 terms."))
    fp8_activations: Literal["dynamic", "calibrated"] = Field("dynamic", description=(
        "With fp8: scale activations from their own largest values at each call (dynamic: "
        "a pass over every row before each product), or once for good from the largest "
        "values each layer met during start-up calibration calls of three prompts at 20 "
        "steps or more, with a margin of 2 (calibrated: the scaling is folded into the "
        "kernel that makes the activations; larger values clip)."))

    cudnn_benchmark: bool = Field(False, description=(
        "Have cuDNN time its algorithms for each convolution shape the first time it meets "
        "it and keep the fastest (PyTorch's cudnn.benchmark, for the whole replica process), "
        "instead of taking its heuristics' choice. The start-up warm-up meets the default "
        "shapes first. Replicas may choose differently, so the same seed can differ in the "
        "last bits between them."))

    attention: Literal["auto", "cudnn", "flash", "efficient"] = Field("auto", description=(
        "Which of PyTorch's fused attention kernels the denoiser tries first: auto "
        "(PyTorch's own order: FlashAttention-2, then memory-efficient; cuDNN last), cudnn (cuDNN's "
        "fused attention, Hopper and later), flash or efficient. The others stay as "
        "fallbacks for shapes the first cannot run."))

    cfg_cutoff: float | None = Field(None, gt=0, lt=1, description=(
        "SDXL: stop classifier-free guidance after this fraction of the steps (as diffusers' "
        "SDXLCFGCutoffCallback: the step at index int(steps x cutoff) is the last guided), "
        "so the later steps run the UNet once per image instead of twice. Changes the "
        "images (less guidance late in the schedule); inpainting calls keep full guidance. "
        "Unset: guidance on every step."))

    batch_buckets: list[int] = Field(default_factory=list, description=(
        "Image counts every pipeline call is padded up to (the smallest that holds the "
        "call; the extra rows are computed and dropped), so compiled code meets only these "
        "batch sizes; with `compile`, each is compiled for its exact shapes during the "
        "warm-up instead of once with dynamic shapes. Empty: calls run at their own size. "
        "The largest must hold batching.max_batch_size."))

    compile_sizes: list[tuple[int, int]] = Field(default_factory=list, description=(
        "With compile: image sizes, as [width, height], compiled during the start-up "
        "warm-up besides the model's default size (each takes as long to compile as the "
        "default). With batch_buckets, compiled code is specialised to each image size "
        "too: a call at a size not compiled runs uncompiled rather than stall the replica "
        "for a compilation."))

    @model_validator(mode="after")
    def _buckets_ascending(self) -> SpeedConfig:
        if (self.fp8_scaling != "row" or not self.fp8_fast_accum
                or self.fp8_activations != "dynamic") and not self.fp8:
            raise ValueError("fp8_scaling, fp8_fast_accum and fp8_activations apply only "
                             "with fp8: true")
        if (self.compile_mode != "default" or self.compile_sizes) and not self.compile:
            raise ValueError("compile_mode and compile_sizes apply only with compile: true")
        if any(w < 8 or h < 8 or w % 8 or h % 8 for w, h in self.compile_sizes):
            raise ValueError("compile_sizes must be [width, height] pairs of multiples of 8")
        buckets = self.batch_buckets
        if any(b < 1 for b in buckets) or buckets != sorted(set(buckets)):
            raise ValueError("batch_buckets must be distinct positive counts in ascending order")
        return self


# The most reference images a Kontext edit may be allowed (limits.max_references), the
# edited one included: what the APIs' fields accept at most.
MOST_REFERENCES = 8


class LimitsConfig(_Strict):
    min_size: int = Field(64, ge=8, description="Smallest width or height in pixels.")
    max_size: int = Field(2048, ge=8, description="Largest width or height in pixels.")
    max_pixels: int = Field(1024 * 1024, ge=64, description="Largest width x height.")
    max_steps: int = Field(50, ge=1, le=500, description="Most denoising steps per request.")
    max_outputs: int = Field(4, ge=1, le=16, description="Most images per request.")
    max_loras: int = Field(4, ge=0, le=16, description="Most LoRA adapters one request stacks.")
    max_references: int = Field(4, ge=1, le=MOST_REFERENCES, description=(
        "Kontext models: most reference images one edit reads, the edited image included "
        "(each adds its tokens to every step)."))
    max_controlnets: int = Field(3, ge=0, le=8, description=(
        "Most ControlNets one request combines (each runs at every step)."))
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, description=(
        "Largest input image (img2img, inpainting) as sent, in bytes; over it: 413."))
    max_image_pixels: int = Field(4096 * 4096, ge=64, description=(
        "Largest input image in pixels, read from its header before decoding; over it: 413."))
    max_request_pixels: int = Field(4 * 1024 * 1024, ge=64, description=(
        "Memory budget of one request: largest width x height x num_outputs. A request "
        "over it gets 422 before it reaches the GPU."))

    @model_validator(mode="after")
    def _sizes_ordered(self) -> LimitsConfig:
        if self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        return self


class DefaultsConfig(_Strict):
    width: int = Field(1024, description="Width when a request gives none.")
    height: int = Field(1024, description="Height when a request gives none.")
    num_inference_steps: int = Field(30, ge=1, description="Steps when a request gives none.")
    guidance_scale: float = Field(7.5, ge=0, le=50, description="Guidance when none is given.")
    scheduler: str | None = Field(None, description=(
        "Scheduler when a request gives none; unset: the family's first (K_EULER for "
        "sdxl, FlowMatchEuler for flux)."))
    guidance_rescale: float = Field(0.0, ge=0, le=1, description=(
        "SDXL: guidance rescale when a request gives none (0: none). Rescales each guided "
        "prediction to the spread of the prompt's own, against the over-exposure strong "
        "guidance gives zero-terminal-SNR models (about 0.7 for those)."))

    def check_within(self, limits: LimitsConfig, family: Family) -> None:
        """Raise ValueError if a request made of these defaults would break `limits`."""
        if self.scheduler is not None and self.scheduler not in family.schedulers:
            raise ValueError(f"defaults.scheduler must be one of {', '.join(family.schedulers)}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value % family.size_multiple or not limits.min_size <= value <= limits.max_size:
                raise ValueError(f"defaults.{name} must be a multiple of "
                                 f"{family.size_multiple} within limits")
        if self.width * self.height > min(limits.max_pixels, limits.max_request_pixels):
            raise ValueError("defaults.width x defaults.height exceeds limits.max_pixels "
                             "or limits.max_request_pixels")
        if self.num_inference_steps > limits.max_steps:
            raise ValueError("defaults.num_inference_steps exceeds limits.max_steps")


class SchedulerOptions(_Strict):
    """How an SDXL model's schedulers place and read their steps, over the checkpoint's own
    scheduler config: what few-step distilled models ask for. SDXL-Lightning and Hyper-SD
    sample with `trailing` timesteps (the last step at the noisiest timestep); Lightning's
    1-step UNet predicts the sample; v-prediction fine-tunes predict velocity. Unset: the
    checkpoint's (SDXL base: leading, epsilon; SDXL-Turbo's folder already says trailing)."""

    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = Field(None, description=(
        "Where the steps fall among the training timesteps; trailing for SDXL-Lightning "
        "and Hyper-SD."))
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = Field(
        None, description=(
            "What the UNet predicts: epsilon (SDXL), v_prediction, or sample (Lightning's "
            "1-step UNet)."))
    rescale_betas_zero_snr: bool | None = Field(None, description=(
        "Rescale the noise schedule to zero terminal SNR, as v-prediction fine-tunes "
        "trained that way (e.g. NoobAI-XL V-Pred) ask, with trailing timesteps; the "
        "HeunDiscrete, PNDM and DEIS schedulers cannot, and are not offered then."))

    def given(self) -> dict[str, str | bool]:
        """The options set, as diffusers' scheduler configs name them."""
        return self.model_dump(exclude_none=True)
