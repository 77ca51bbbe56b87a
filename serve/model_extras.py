"""What a model's config adds around its pipeline: the output's checks and marks (safety
checker, watermark, content credentials), merged LoRAs, FreeU, styles, prompt handling,
textual inversions, the refiner and the hires pass's upscalers (`serve.model_config`
assembles them with the parts in `serve.model_parts`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from serve.model_parts import ConfigError, PathOrEmbedded, _Strict


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
