"""Generated files served by URL for a limited time (the in-memory backend's part)."""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

from serve.types import MEDIA_TYPES

_EXTENSIONS = {media: ext for ext, media in MEDIA_TYPES.items()}
_OUTPUT_PATH = re.compile(r"/files/(?P<name>[\w-]{22}\.[a-z]{3,4})$")


def file_name(media_type: str) -> str:
    """A fresh unguessable file name (128 random bits) with the type's extension."""
    return f"{secrets.token_urlsafe(16)}.{_EXTENSIONS.get(media_type, 'bin')}"


def output_name(url: str) -> str | None:
    """The file name in a URL of the form this server gives its outputs
    (`.../files/<name>`); None for other URLs."""
    try:
        match = _OUTPUT_PATH.search(urlsplit(url).path)
    except ValueError:
        return None
    return match["name"] if match else None


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    media_type: str


class FileStore:
    """Bounded by age (`ttl_s`) and total size (`max_bytes`, oldest dropped first)."""

    def __init__(self, ttl_s: float, max_bytes: int):
        self._ttl_s, self._max_bytes = ttl_s, max_bytes
        self._files: OrderedDict[str, tuple[StoredFile, float]] = OrderedDict()  # + expiry
        self._bytes = 0

    def put(self, data: bytes, media_type: str, name: str | None = None) -> str:
        """Store and return the file's name (by default a random id plus extension)."""
        self._expire()
        name = name or file_name(media_type)
        self._files[name] = (StoredFile(data, media_type), time.monotonic() + self._ttl_s)
        self._bytes += len(data)
        while self._bytes > self._max_bytes and len(self._files) > 1:
            self._drop(next(iter(self._files)))
        return name

    def get(self, name: str) -> StoredFile | None:
        self._expire()
        found = self._files.get(name)
        return found[0] if found else None

    def delete(self, name: str) -> bool:
        self._expire()
        if name not in self._files:
            return False
        self._drop(name)
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        while self._files:
            name, (_, expires_at) = next(iter(self._files.items()))
            if expires_at > now:
                break
            self._drop(name)

    def _drop(self, name: str) -> None:
        self._bytes -= len(self._files.pop(name)[0].data)
