"""Webhooks for predictions: only to allowed hosts, throttled, retried with back-off, and
signed as Replicate signs them (Standard Webhooks: `webhook-id`, `webhook-timestamp` and
`webhook-signature`, an HMAC-SHA256 of "<id>.<timestamp>.<body>"), so receivers that check
them with `replicate.webhooks.validate` or a Standard Webhooks library keep working."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import secrets
import time
import weakref
from collections.abc import Iterable
from hashlib import sha256
from typing import Annotated

import httpx
from pydantic import AfterValidator

from serve.errors import InvalidField
from serve.urls import check_allowed_url

log = logging.getLogger("ray.serve.atelier.webhooks")

EVENTS = ("start", "output", "logs", "completed")
_THROTTLED = ("output", "logs")
_MIN_INTERVAL_S = 0.5
_ATTEMPTS = 4
_FIRST_BACKOFF_S = 0.5


SECRET_PREFIX = "whsec_"


def check_secret(secret: str) -> str:
    """`secret` if it is a signing secret in Standard Webhooks' form (whsec_ and the base64
    of 24 to 64 random bytes); ValueError otherwise."""
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not secret.startswith(SECRET_PREFIX) or not 24 <= len(key) <= 64:
        raise ValueError("a webhook signing secret is whsec_ followed by the base64 of 24 to "
                         "64 random bytes")
    return secret


SigningSecret = Annotated[str, AfterValidator(check_secret)]  # a config field's type


def webhook_secret_from_env() -> str | None:
    """ATELIER_WEBHOOK_SECRET, checked; None when unset."""
    value = os.environ.get("ATELIER_WEBHOOK_SECRET")
    if not value:
        return None
    try:
        return check_secret(value)
    except ValueError as exc:
        raise ValueError(f"ATELIER_WEBHOOK_SECRET: {exc}") from None


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def key_secret(master: str, owner: str) -> str:
    """The signing secret of the API key named `owner`, derived from the master secret
    (HMAC-SHA256 of the name): each key signs only its own predictions' webhooks, and one
    key's secret tells nothing of the master or of another key's."""
    key = base64.b64decode(master.removeprefix(SECRET_PREFIX))
    derived = hmac.new(key, b"atelier webhook secret of " + owner.encode(), sha256).digest()
    return SECRET_PREFIX + base64.b64encode(derived).decode()


def signed_headers(secret: str, message_id: str, body: bytes, timestamp: int) -> dict:
    """The headers that let the receiver check `body` came from this server."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, sha256).digest()
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": f"v1,{base64.b64encode(mac).decode()}",
            "content-type": "application/json"}


def check_webhook(url: str, allowed_hosts: Iterable[str]) -> None:
    """Raise InvalidField("webhook") unless `url` is http(s) to an allowed host[:port]."""
    check_allowed_url(url, allowed_hosts, "webhook", "webhook_allowed_hosts")


def check_events(events: list[str] | None) -> tuple[str, ...]:
    """The events to send (all by default). Raises InvalidField for an unknown one."""
    if events is None:
        return EVENTS
    unknown = [e for e in events if e not in EVENTS]
    if unknown:
        raise InvalidField("webhook_events_filter", f"unknown events {unknown}; "
                                                    f"known: {', '.join(EVENTS)}")
    return tuple(events)


# The event loop keeps only weak references to tasks: deliveries are held here.
_DELIVERING: set[asyncio.Task] = set()
# Deliveries under way to one receiver (host and port), per client: a receiver that hangs
# holds this many connections and no more; its other deliveries wait their turn.
PER_RECEIVER = 16
_RECEIVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _receiver_slots(client: httpx.AsyncClient, url: str) -> asyncio.Semaphore:
    by_host, receiver = _RECEIVERS.setdefault(client, {}), httpx.URL(url).netloc
    if receiver not in by_host:
        by_host[receiver] = asyncio.Semaphore(PER_RECEIVER)
    return by_host[receiver]


class WebhookSender:
    """Delivers one prediction's events in order, in the background, so that a slow or
    failing receiver never holds the prediction back. `output` and `logs` go out at most
    every `_MIN_INTERVAL_S`; while earlier events are being delivered, a newer one of
    these takes the place of the one still waiting (each body is the whole prediction).
    An event that fails is retried with back-off until a newer one waits behind it;
    `completed` always is. Each event has its own `webhook-id`, the same for its
    retries; each attempt is signed with its own timestamp."""

    def __init__(self, url: str, events: tuple[str, ...], client: httpx.AsyncClient,
                 secret: str):
        self._url, self._events, self._client, self._secret = url, events, client, secret
        self._last_sent = 0.0
        self._waiting: list[tuple[str, bytes]] = []
        self._delivering: asyncio.Task | None = None

    def send(self, event: str, body: dict) -> None:
        """Queue `event` with `body` (serialised now) for delivery; returns at once."""
        if event not in self._events:
            return
        now = time.monotonic()
        if event in _THROTTLED and now - self._last_sent < _MIN_INTERVAL_S:
            return
        self._last_sent = now
        content = json.dumps(body).encode()
        if event in _THROTTLED and self._waiting and self._waiting[-1][0] in _THROTTLED:
            self._waiting[-1] = (event, content)
        else:
            self._waiting.append((event, content))
        self._start()

    def complete(self, body: dict) -> None:
        """Queue `completed`; its delivery (and that of the events before it) goes on
        after the prediction's own task has ended."""
        if "completed" in self._events:
            self._waiting.append(("completed", json.dumps(body).encode()))
            self._start()

    def _start(self) -> None:
        if self._delivering is None or self._delivering.done():
            self._delivering = asyncio.get_running_loop().create_task(self._deliver())
            _DELIVERING.add(self._delivering)
            self._delivering.add_done_callback(_DELIVERING.discard)

    async def _deliver(self) -> None:
        while self._waiting:
            event, content = self._waiting.pop(0)
            await self._post(event, content)

    async def _post(self, event: str, content: bytes) -> None:
        message_id, delay = f"msg_{secrets.token_hex(12)}", _FIRST_BACKOFF_S
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with _receiver_slots(self._client, self._url):  # then signed: fresh
                    headers = signed_headers(self._secret, message_id, content,
                                             int(time.time()))
                    r = await self._client.post(self._url, content=content, headers=headers,
                                                timeout=10)
                if r.status_code < 500:
                    return
                reason = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                reason = type(exc).__name__
            superseded = event != "completed" and bool(self._waiting)
            log.warning("webhook %s for %s failed (%s), attempt %d/%d%s", event,
                        json.loads(content).get("id"), reason, attempt, _ATTEMPTS,
                        "; a newer event replaces it" if superseded else "")
            if superseded or attempt == _ATTEMPTS:
                return
            await asyncio.sleep(delay)
            delay *= 2
