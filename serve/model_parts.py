"""The parts of a model's configuration: pipeline families and what each accepts, the
batching, speed, limits, defaults, refiner, safety checker and watermark sections
(`serve.config` assembles them; ControlNets and IP-Adapters are in `serve.steering`, the
checks of what a model's paths hold in `serve.folders`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
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


class SafetyCheckerConfig(_Strict):
    """An image safety checker run on every output image (Stable Diffusion's, as Replicate's
    SDXL and FLUX models run it): flagged images are withheld."""

    path: Path = Field(description=(
        "Local folder of a StableDiffusionSafetyChecker (config.json, model.safetensors) "
        "and its CLIP image processor (preprocessor_config.json), e.g. "
        "CompVis/stable-diffusion-safety-checker. Never fetched."))
    allow_disable: bool = Field(True, description=(
        "Requests may turn the check off (Replicate's `disable_safety_checker`, also taken "
        "by /generate), as on Replicate's API. False: every image is checked whatever the "
        "request says."))


class WatermarkConfig(_Strict):
    """The invisible watermark of Stability AI's SDXL and Black Forest Labs' FLUX.1
    reference code (the invisible-watermark library's dwtDct, with the family's message),
    in every image of 256x256 pixels or more, so that the detectors run on those models'
    images find it in ours."""

    allow_disable: bool = Field(True, description=(
        "Requests may leave the mark out (Replicate's `apply_watermark: false`, also taken "
        "by /generate), as on Replicate's API. False: every image is marked whatever the "
        "request says."))


class ContentCredentialsConfig(_Strict):
    """Content Credentials (C2PA): each image carries a manifest, signed with the operator's
    certificate, saying a trained model generated it and which, as OpenAI's and Black
    Forest Labs' APIs sign their images. The files must be on every node."""

    certificate: Path = Field(description=(
        "PEM file: the signing certificate, then the certificates of the CAs that issued "
        "it (C2PA's profile: an end-entity certificate with digitalSignature usage and an "
        "extended key usage such as emailProtection or documentSigning, not self-signed)."))
    private_key: Path = Field(description="PEM file (PKCS#8) of the certificate's key.")
    algorithm: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = (
        Field("es256", description="Signature algorithm, as the key's type asks."))
    timestamp_url: str | None = Field(None, description=(
        "An RFC 3161 time-stamp authority asked at each signature, so that the signature "
        "outlives the certificate; unset: none (the nodes must reach it)."))


class MergedLoraConfig(_Strict):
    """A LoRA merged into the model's weights at load, for every request: a few-step LoRA
    (SDXL-Lightning's, Hyper-SD's, LCM-LoRA) or a house style on a base checkpoint. Read
    and merged as diffusers' `load_lora_weights` and `fuse_lora` do (its layouts: diffusers,
    PEFT, kohya), text-encoder parts included; requests' own adapters come on top."""

    path: Path = Field(description="The LoRA's .safetensors file (local; never fetched).")
    scale: float = Field(1.0, ge=-4, le=4, description="How strongly it is merged.")


class FreeUConfig(_Strict):
    """FreeU (Si et al., 2023), as diffusers' `enable_freeu` sets it on an SDXL UNet: in the
    first two stages of its decoder, the backbone's features are amplified and the low
    frequencies of the skip connections damped, for more detail at no cost in speed to
    speak of. The defaults are the FreeU authors' values for SDXL."""

    s1: float = Field(0.9, ge=0, le=2, description="Stage 1's skip-feature scale.")
    s2: float = Field(0.2, ge=0, le=2, description="Stage 2's skip-feature scale.")
    b1: float = Field(1.3, ge=0, le=3, description="Stage 1's backbone-feature scale.")
    b2: float = Field(1.4, ge=0, le=3, description="Stage 2's backbone-feature scale.")


class StyleConfig(_Strict):
    """A named style requests may ask for (`style`), as SDXL front ends offer them
    (Fooocus, Clipdrop): a template the request's prompt is set into, and words to steer
    away from, added to the request's negative prompt."""

    prompt: str = Field(pattern=r"\{prompt\}", max_length=2000, description=(
        "The prompt, with `{prompt}` where the request's goes, e.g. `cinematic still of "
        "{prompt}, shallow depth of field, film grain`."))
    negative_prompt: str = Field("", max_length=2000, description=(
        "Put before the request's own negative prompt (SDXL; FLUX models take none)."))

    def apply(self, prompt: str, negative_prompt: str) -> tuple[str, str]:
        """The request's prompt and negative prompt in this style."""
        negative = ", ".join(p for p in (self.negative_prompt, negative_prompt) if p)
        return self.prompt.replace("{prompt}", prompt), negative


# SDXL's first text encoder (CLIP ViT-L) has 12 layers: skipping 11 reads its embeddings.
MOST_CLIP_SKIP = 11


class PromptConfig(_Strict):
    """How an SDXL model's text encoders read prompts and negative prompts. CLIP reads 77
    tokens (a start token, 75 of the prompt's, an end token); diffusers and Replicate's
    SDXL cut a prompt there."""

    chunks: int = Field(1, ge=1, le=8, description=(
        "How many chunks of 75 tokens are read, as AUTOMATIC1111's WebUI and compel read "
        "long prompts: each chunk encoded on its own, their embeddings joined; tokens past "
        "the last chunk are cut. 1: diffusers' 77 tokens, Replicate's SDXL images. Requests "
        "whose prompts take different chunk counts run in separate calls; compiled for exact "
        "shapes (`speed.batch_buckets`), calls of several chunks run uncompiled."))
    weights: bool = Field(False, description=(
        "Read AUTOMATIC1111's emphasis: (words) weighs 1.1, [words] 1/1.1, (words:1.5) "
        "1.5, nested groups multiply, \\( \\) \\[ \\] are literal brackets. Off: brackets "
        "are text, as in diffusers."))
    comma_backtrack: int = Field(20, ge=0, le=74, description=(
        "With several chunks: a chunk that would end within this many tokens after a comma "
        "ends after the comma, the words after it starting the next chunk, so a phrase is "
        "not split between two (AUTOMATIC1111's WebUI, 20 by default; 0: cut every 75 "
        "tokens, as compel does)."))
    clip_skip: int = Field(0, ge=0, le=MOST_CLIP_SKIP, description=(
        "The text encoders' layer prompts are read from when a request names none: 0 "
        "reads SDXL's penultimate layer, as SDXL was trained; each step more reads one "
        "layer earlier, as diffusers' `clip_skip` counts (the WebUI's `Clip skip 2` is 0 "
        "here). Some fine-tunes are trained on an earlier layer. Requests override it "
        "(`clip_skip`); the refiner reads its own penultimate layer."))

    def given(self) -> dict[str, int | bool]:
        """The settings that differ from diffusers' reading."""
        return {name: value for name, value in self.model_dump().items()
                if value != PromptConfig.model_fields[name].default}


class TextualInversionConfig(_Strict):
    """An SDXL textual-inversion embedding (e.g. a negative embedding such as
    unaestheticXL): a new word whose vectors the file holds for each text encoder, loaded
    as diffusers' `load_textual_inversion` loads it into both."""

    path: Path = Field(description=(
        "The embedding's .safetensors file as SDXL embeddings are shared: a `clip_l` "
        "tensor (vectors x 768 for SDXL's first text encoder) and a `clip_g` tensor "
        "(vectors x 1280 for its second). Local; never fetched."))
    token: str = Field(pattern=r"^\S+$", max_length=100, description=(
        "The word prompts and negative prompts use for it, e.g. `unaestheticXL`; an "
        "embedding of several vectors takes that many token positions."))


class RefinerConfig(PathOrEmbedded):
    """An SDXL refiner (stable-diffusion-xl-refiner-1.0's architecture) that runs after the
    base model for Replicate's `refine` input. It uses the base model's text_encoder_2 and
    VAE, as diffusers' and Replicate's SDXL pipelines do; its own copies are not loaded."""

    path: Path | None = Field(None, description=(
        "Local diffusers folder of the refiner (safetensors weights), or a single-file "
        "refiner checkpoint (`.safetensors`, original layout, as sd_xl_refiner_1.0 and its "
        "fine-tunes are shared) read with `configs_from`. Never fetched."))
    configs_from: Path | None = Field(None, description=(
        "With a single-file `path`: a refiner diffusers folder (e.g. "
        "stable-diffusion-xl-refiner-1.0) whose configs and scheduler go with the file's "
        "UNet; none of its weights are read. The UNet is converted once into the cache."))
    embedded: Literal["tiny-sdxl-refiner"] | None = Field(None, description=(
        "Build and use the embedded random-weight refiner of the tiny SDXL."))
    variant: str | None = Field(None, description="Weights file variant, e.g. fp16.")

    @model_validator(mode="after")
    def _configs_with_a_file(self) -> RefinerConfig:
        if self.configs_from is not None and (self.path is None or self.variant is not None):
            raise ValueError("refiner.configs_from: goes with a single-file path alone "
                             "(no embedded, no variant)")
        return self


# The hires pass's own upscaler: bicubic, always there; a model's `upscalers` add to it.
BICUBIC = "bicubic"


class UpscalerConfig(PathOrEmbedded):
    """An image upscaler of the ESRGAN family (RRDBNet) for the hires pass, as the WebUI's
    hires. fix offers them: each first-pass image is upscaled by it (x4, x2 or x1, read
    from the weights), brought to the hires size by area, then redrawn by img2img."""

    path: Path | None = Field(None, description=(
        "Local weights file: Real-ESRGAN's `.pth` (e.g. RealESRGAN_x4plus.pth, its "
        "`params_ema` tensors), an ESRGAN model in the original layout (e.g. "
        "4x-UltraSharp.pth), or either as `.safetensors`. Read as tensors only. Never "
        "fetched."))
    embedded: Literal["tiny-esrgan"] | None = Field(None, description=(
        "Build and use the embedded random-weight x4 RRDBNet."))
    tile: int = Field(256, ge=0, le=4096, multiple_of=4, description=(
        "Upscale images larger than this many pixels a side in tiles of this size, as "
        "Real-ESRGAN's --tile does, so the network's activations (at 4x the input's size "
        "for a x4 model) grow with the tile, not the image. 0: whole images."))
    tile_pad: int = Field(16, ge=0, le=256, multiple_of=4, description=(
        "Pixels of its surroundings each tile is read with (their output is thrown away), "
        "so tiles meet without seams."))

    def check_files(self, where: str) -> None:
        """Raise ConfigError naming `where`.path unless it is a .pth or .safetensors file."""
        if self.path is not None and (not self.path.is_file()
                                      or self.path.suffix not in (".pth", ".safetensors")):
            raise ConfigError(f"{where}.path: {self.path} is not a .pth or .safetensors file")
