"""Replicate request shapes: the `stability-ai/sdxl` inputs, the create body, and the
`Prefer: wait` and `Cancel-After` headers."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from serve.errors import InvalidField
from serve.types import MAX_SEED, SCHEDULERS, OutputFormat

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
_WAIT = re.compile(r"(?:^|[,;\s])wait(?:=(\d+))?(?:$|[,;\s])")


class SDXLInput(BaseModel):
    """stability-ai/sdxl's inputs; unset values take the served model's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000, description="Input prompt")
    negative_prompt: str = Field("", max_length=4000, description="Input negative prompt")
    width: int | None = Field(None, ge=8, description="Width of output image")
    height: int | None = Field(None, ge=8, description="Height of output image")
    num_outputs: int = Field(1, ge=1, le=4, description="Number of images to output")
    scheduler: str | None = Field(None, description=f"scheduler: {', '.join(SCHEDULERS)}")
    num_inference_steps: int | None = Field(None, ge=1, le=500, description="Denoising steps")
    guidance_scale: float | None = Field(None, ge=1, le=50, description="Classifier-free guidance")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; blank: random")
    image: str | None = Field(None, description=(
        "Input image for img2img or inpaint mode, as a data URI (or base64)"))
    mask: str | None = Field(None, description=(
        "Input mask for inpaint mode: white areas are repainted, black kept"))
    prompt_strength: float = Field(0.8, ge=0, le=1, description=(
        "Prompt strength with img2img / inpaint; 1.0 destroys the input image's information"))
    lora_weights: str | None = Field(None, description="A LoRA name from GET /v1/loras")
    lora_scale: float | None = Field(None, ge=-4, le=4, description="Scale of lora_weights")
    output_format: OutputFormat = Field("png", description="png, webp or jpeg")
    output_quality: int = Field(90, ge=1, le=100, description="webp/jpeg quality")
    apply_watermark: bool = Field(True, description="Accepted; no watermark is applied")
    disable_safety_checker: bool = Field(False, description="Accepted; no checker runs")


class PredictionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: SDXLInput
    version: str | None = None
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    stream: bool | None = None


def duration_s(value: str | None) -> float | None:
    """Seconds in a Cancel-After value: a number of seconds, or units like 1h30m, 45s,
    500ms. Raises InvalidField for anything else."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise InvalidField("Cancel-After", f"not a duration: {value!r}") from None
        seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if not 0 < seconds <= 86_400:
        raise InvalidField("Cancel-After", "must be between 0 and 24h")
    return seconds


def wait_seconds(prefer: str) -> float:
    match = _WAIT.search(prefer)
    if not match:
        return 0
    return float(min(60, max(1, int(match[1])))) if match[1] else 60.0
