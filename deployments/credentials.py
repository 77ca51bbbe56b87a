"""Content Credentials: each image signed with a C2PA manifest saying a trained model made
it (IPTC's trainedAlgorithmicMedia) and which, with the operator's certificate."""

from __future__ import annotations

import io
import json
import threading

from PIL import Image

from deployments.encoding import GENERATED, encode_image
from serve.model_extras import ContentCredentialsConfig

# The signer is shared by the encoding threads; a signature takes milliseconds.
_SIGNING = threading.Lock()


class ContentCredentials:
    """Signs encoded images. Built at the replica's start, where a certificate and key
    that cannot sign fail it, naming the files."""

    def __init__(self, config: ContentCredentialsConfig):
        import c2pa

        self._c2pa = c2pa
        info = c2pa.C2paSignerInfo(config.algorithm.encode(), config.certificate.read_bytes(),
                                   config.private_key.read_bytes(),
                                   config.timestamp_url and config.timestamp_url.encode())
        # No thumbnail: it is what makes signing slow (tens of ms) and the manifest large.
        self._context = c2pa.Context(c2pa.Settings.from_dict(
            {"builder": {"thumbnail": {"enabled": False}}}))
        try:
            self._signer = c2pa.Signer.from_info(info)
            self.sign(encode_image(Image.new("RGB", (8, 8)), "png", 100), "image/png",
                      "start-up check")
        except c2pa.C2paError as exc:
            raise ValueError(f"content_credentials: {config.certificate} and "
                             f"{config.private_key} cannot sign ({exc})") from exc

    def sign(self, data: bytes, media_type: str, model: str) -> bytes:
        """`data` with a signed manifest: created by `model`, a trained model."""
        action = {"action": "c2pa.created", "digitalSourceType": GENERATED,
                  "softwareAgent": {"name": f"Atelier ({model})"}}
        manifest = {"claim_generator_info": [{"name": "Atelier"}],
                    "assertions": [{"label": "c2pa.actions", "data": {"actions": [action]}}]}
        out = io.BytesIO()
        with _SIGNING, self._c2pa.Builder(json.dumps(manifest), self._context) as builder:
            builder.sign(self._signer, media_type, io.BytesIO(data), out)
        return out.getvalue()
