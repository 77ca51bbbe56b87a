"""nightmareai/real-esrgan's inputs, for the names under which a model enlarges images
(`upscaling_aliases`): the image is answered at strength 0, through the model's first
upscaler and resized to `scale` times its size (`upscale`; at 1 or below too, as
real-esrgan cleans or shrinks it), not redrawn, and the prediction's output is one URL,
as real-esrgan's is."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

from serve.routes.replicate_inputs import ReplicateInputBase


class RealEsrganInput(ReplicateInputBase):
    """nightmareai/real-esrgan's inputs: the image and how many times larger it comes back;
    GFPGAN's face enhancement is not served."""

    image: str = Field(description=(
        "Input image, as a data URI, base64 or an allowed URL; it and the answer within "
        "the model's max_image_pixels"))
    scale: float = Field(4, gt=0, le=10, description=(
        "Factor to scale the image by: the upscaler's output resized to it (by area where "
        "that shrinks it, bicubically past the upscaler's own factor)"))
    face_enhance: bool = Field(False, description=(
        "Run GFPGAN face enhancement: not served here (only false is taken)"))

    # What the request built from it takes besides: the image answered as it is (no step
    # runs), with nothing else drawn.
    prompt: ClassVar[str] = ""
    mask: ClassVar[None] = None
    prompt_strength: ClassVar[float] = 0.0
    seed: ClassVar[None] = None
    disable_safety_checker: ClassVar[bool] = False

    @field_validator("face_enhance")
    @classmethod
    def _no_faces(cls, value: bool) -> bool:
        if value:
            raise ValueError("face enhancement (GFPGAN) is not served here; send false")
        return value

    def request_args(self) -> dict[str, Any]:
        return {"width": None, "height": None, "num_outputs": 1, "upscale": self.scale,
                "upscaler": None, "through_upscaler": True, "output_format": "png"}

    def field_of(self, arg: str) -> str:
        if arg in ("width", "height"):
            return "image"  # the answer is the image's size, enlarged
        return "scale" if arg in ("upscale", "upscaler") else arg
