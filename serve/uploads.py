"""Replicate's files API: input files uploaded once, then named by URL in predictions.

The official `replicate` client uploads every file object it finds in an input
(`open("photo.png", "rb")`, a `Path`) with `POST /v1/files` and sends the file's
`urls.get` in its place, unless the caller asks for `file_encoding_strategy="base64"`.
An input URL whose path is `/v1/files/<id>` naming a file uploaded here is read from the
store (Redis when configured, so any ingress replica finds it), with no HTTP fetch and no
`image_allowed_hosts` entry needed. Uploads are kept `file_ttl_s`, as output files are.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

_UPLOAD_PATH = re.compile(r"/v1/files/(?P<id>[a-z0-9]{20,64})(?:/download)?/?$")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Upload:
    name: str
    content_type: str
    size: int
    checksums: dict[str, str]
    metadata: dict
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    created: float = field(default_factory=time.time)
    owner: str = "open"  # the uploading API key's name, as a prediction's `client`

    @classmethod
    def of(cls, data: bytes, name: str, content_type: str, metadata: dict,
           owner: str = "open") -> Upload:
        return cls(name=name, content_type=content_type, size=len(data), metadata=metadata,
                   owner=owner,
                   checksums={"sha256": hashlib.sha256(data).hexdigest(),
                              "md5": hashlib.md5(data, usedforsecurity=False).hexdigest()})

    def to_state(self) -> dict:
        return asdict(self)

    def to_json(self, base_url: str, ttl_s: float) -> dict:
        """As Replicate's API shows a file; `urls.get` is what inputs name it by."""
        body = {k: v for k, v in asdict(self).items() if k not in ("created", "owner")}
        return {**body, "etag": f'"{self.checksums["md5"]}"',
                "created_at": _iso(self.created), "expires_at": _iso(self.created + ttl_s),
                "urls": {"get": f"{base_url}/v1/files/{self.id}"}}


def upload_id(url: str) -> str | None:
    """The upload id in a `.../v1/files/<id>` (or `.../download`) URL; None for others."""
    try:
        match = _UPLOAD_PATH.search(urlsplit(url.strip()).path)
    except ValueError:
        return None
    return match["id"] if match else None
