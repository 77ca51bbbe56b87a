"""API keys: `Authorization: Bearer <key>` or `Token <key>` (older Replicate clients).

A key may carry a name (for logs and metrics) and rates of generation requests and of
images per minute (`serve.rate_limits`), so that teams sharing the GPUs cannot crowd each
other out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.webhooks import SigningSecret

# Health checks and file links (whose random names are the capability) need no key.
OPEN_PREFIXES = ("/healthz", "/files/")


class ApiKeyConfig(BaseModel):
    """A key with its name and limits (a plain string in `api_keys` is a key without)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, repr=False)
    name: str | None = Field(None, max_length=64, pattern=r"^[\w.-]+$", description=(
        "Shown in logs and metrics instead of the key; default: key-<first 8 hex of its "
        "SHA-256>."))
    requests_per_minute: int | None = Field(None, ge=1, description=(
        "Generation requests this key may make per minute (a bucket of that many, refilled "
        "evenly); past it: 429 with Retry-After. Polling, uploads and listings are free. "
        "Unset: no limit."))
    images_per_minute: int | None = Field(None, ge=1, description=(
        "Images this key may ask for per minute, a request of n images taking n (a bucket "
        "of that many, refilled evenly); past it: 429 with Retry-After. At least every "
        "model's limits.max_outputs. Unset: no limit."))
    priority: int = Field(0, ge=-100, le=100, description=(
        "Where this key's requests queue in a model replica: waiting requests of a higher "
        "priority run first (compatible lower ones may share their call), e.g. 10 for an "
        "interactive app's key, -10 for a batch job's. Equal priorities run oldest first."))
    sees_all_predictions: bool = Field(False, description=(
        "Read, list and cancel every key's predictions (an operator's key); otherwise a "
        "key sees only those made with its name."))
    models: list[str] | None = Field(None, min_length=1, description=(
        "The served models (ids or aliases) this key may use; others are answered as not "
        "served (404), are left out of model listings, and a request naming no model gets "
        "the first of these. Unset: every model."))
    max_unfinished_predictions: int | None = Field(None, ge=1, description=(
        "Predictions of this key unfinished at once (accepted or being accepted, not yet "
        "finished), on all ingress replicas together; past it a create is refused with 429 "
        "and Retry-After, so that one key's backlog leaves room for others'. Unset: only "
        "the server's bound."))
    webhook_secret: SigningSecret | None = Field(None, repr=False, description=(
        "The secret that signs this key's webhooks (whsec_ + base64 of 24-64 bytes), which "
        "GET /v1/webhooks/default/secret gives it. Unset: one derived from the server's "
        "webhook_secret and the key's name, so that no key can sign another's webhooks."))

    @field_validator("name")
    @classmethod
    def _not_open(cls, value: str | None) -> str | None:
        if value == "open":  # a request without a key is known as "open", which sees all
            raise ValueError("'open' names the requests of a server without keys; choose "
                             "another name")
        return value


@dataclass(frozen=True)
class ApiKey:
    secret: bytes = field(repr=False)
    name: str = ""
    requests_per_minute: int | None = None
    images_per_minute: int | None = None
    models: frozenset[str] | None = None  # the ids and aliases it may use; None: all
    priority: int = 0
    sees_all_predictions: bool = False
    webhook_secret: str | None = field(default=None, repr=False)
    max_unfinished_predictions: int | None = None

    def may_use(self, names: Iterable[str]) -> bool:
        """Whether the key may use the model of these names (its id and aliases)."""
        return self.models is None or not self.models.isdisjoint(names)


def configured_keys(config_keys: Iterable[str | ApiKeyConfig]) -> tuple[ApiKey, ...]:
    """Keys from the config plus the comma-separated ATELIER_API_KEYS variable (those
    have no limits)."""
    env = [k.strip() for k in os.environ.get("ATELIER_API_KEYS", "").split(",")]
    keys = [k if isinstance(k, ApiKeyConfig) else ApiKeyConfig(key=k)
            for k in [*config_keys, *(k for k in env if k)]]
    return tuple(ApiKey(k.key.encode(), k.name or _default_name(k.key), k.requests_per_minute,
                        k.images_per_minute, None if k.models is None else frozenset(k.models),
                        k.priority, k.sees_all_predictions, k.webhook_secret,
                        k.max_unfinished_predictions)
                 for k in keys)


def webhook_secrets(keys: Iterable[ApiKey]) -> dict[str, str]:
    """The webhook secrets the keys set, by key name; ValueError where keys sharing a name
    (and so their predictions) set different ones."""
    found: dict[str, str] = {}
    for key in keys:
        if key.webhook_secret and found.setdefault(key.name, key.webhook_secret) != \
                key.webhook_secret:
            raise ValueError(f"api_keys: the keys named {key.name!r} set different "
                             "webhook_secret values, but share their predictions")
    return found


def _default_name(key: str) -> str:
    return f"key-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def matching_key(header: str | None, keys: tuple[ApiKey, ...]) -> ApiKey | None:
    """The key the header carries, or None.

    Every key is compared in constant time, and all are compared whatever matches.
    """
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() not in ("bearer", "token"):
        return None
    given, found = token.strip().encode(), None
    for key in keys:
        if hmac.compare_digest(given, key.secret):
            found = key
    return found
