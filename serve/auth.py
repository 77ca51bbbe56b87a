"""API keys: `Authorization: Bearer <key>` or `Token <key>` (older Replicate clients)."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable

# Health checks and file links (whose random names are the capability) need no key.
OPEN_PREFIXES = ("/healthz", "/files/")


def configured_keys(config_keys: Iterable[str]) -> tuple[bytes, ...]:
    """Keys from the config plus the comma-separated ATELIER_API_KEYS variable."""
    env = os.environ.get("ATELIER_API_KEYS", "")
    keys = [*config_keys, *(k.strip() for k in env.split(","))]
    return tuple(k.encode() for k in keys if k)


def authorized(header: str | None, keys: tuple[bytes, ...]) -> bool:
    """True if no keys are set, or the header carries one of them.

    Every key is compared in constant time, and all are compared whatever matches.
    """
    if not keys:
        return True
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() not in ("bearer", "token"):
        return False
    given = token.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched
