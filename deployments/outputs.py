"""What a replica does to a call's images before they leave it, on its encoding threads
beside the next pipeline call: lay a masked-area inpainting into its whole image, check
them (the model's safety checker), watermark, encode, label and sign them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from PIL.Image import Image

from deployments.credentials import ContentCredentials
from deployments.encoding import encode_image
from deployments.safety import SafetyChecker, withheld
from deployments.watermark import MESSAGES, message_bits, watermarked
from serve.config import ContentCredentialsConfig, ModelConfig
from serve.types import MEDIA_TYPES, GenerationRequest

log = logging.getLogger("ray.serve.atelier.model")


class Outputs:
    """A model's marks (the model's id in each image's metadata with `label_images`, the
    invisible watermark, Content Credentials when the server signs) and its safety
    checker, if it has one; `on_flagged(n)` hears how many images the checker flagged."""

    def __init__(self, cfg: ModelConfig, checker: SafetyChecker | None,
                 credentials: dict | None):
        self.model = cfg.id
        self.checker = checker
        self.label = cfg.id if cfg.label_images else None
        self.mark = None if cfg.watermark is None else message_bits(MESSAGES[cfg.family])
        self.credentials = None if not (credentials and self.label) else (
            ContentCredentials(ContentCredentialsConfig.model_validate(credentials)))
        self.on_flagged: Callable[[int], None] = lambda n: None

    def finish(self, request: GenerationRequest, images: Sequence[Image],
               partial: bool = False) -> tuple[list[bytes], tuple[bool, ...]]:
        """The request's images watermarked and encoded, and which the safety checker
        flagged (made black), if the model has one and the request is checked (empty
        otherwise). Images of a request inpainting only its masked area are first laid
        into its whole image."""
        if request.source is not None and request.source.overlay is not None:
            images = [request.source.overlay.apply(image) for image in images]
        mark = self.mark if request.watermark else None
        if not (self.checker and request.safety_check):
            return self._encoded(request, [watermarked(im, mark) for im in images]), ()
        nsfw = tuple(self.checker.flags(images))
        if any(nsfw):
            self.on_flagged(sum(nsfw))
            log.info("%s: %d of the %s of request %s flagged by the safety checker",
                     self.model, sum(nsfw), "partial images" if partial else "images",
                     request.request_id)
        return self._encoded(request, [withheld(im) if bad else watermarked(im, mark)
                                       for im, bad in zip(images, nsfw)]), nsfw

    def _encoded(self, request: GenerationRequest, images: Sequence[Image]) -> list[bytes]:
        """Encoded, labeled, and signed when the server has content credentials; an image
        whose signature fails goes out with its label alone, and the failure is logged."""
        fmt, quality = request.output_format, request.output_quality
        encoded = [encode_image(im, fmt, quality, self.label) for im in images]
        if not self.credentials:
            return encoded
        try:
            return [self.credentials.sign(data, MEDIA_TYPES[fmt], self.model)
                    for data in encoded]
        except Exception as exc:  # noqa: BLE001 (the images are still good)
            log.error("%s: signing the images of request %s failed: %s", self.model,
                      request.request_id, exc)
            return encoded
