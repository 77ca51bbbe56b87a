"""Webhooks for predictions: only to allowed hosts, throttled, retried with back-off."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import httpx

from serve.errors import InvalidField
from serve.urls import check_allowed_url

log = logging.getLogger("ray.serve.atelier.webhooks")

EVENTS = ("start", "output", "logs", "completed")
_THROTTLED = ("output", "logs")
_MIN_INTERVAL_S = 0.5
_ATTEMPTS = 4
_FIRST_BACKOFF_S = 0.5


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


class WebhookSender:
    """Sends one prediction's events in order; `completed` always goes out, retried."""

    def __init__(self, url: str, events: tuple[str, ...], client: httpx.AsyncClient):
        self._url, self._events, self._client = url, events, client
        self._last_sent = 0.0

    async def send(self, event: str, body: dict) -> None:
        if event not in self._events:
            return
        now = time.monotonic()
        if event in _THROTTLED and now - self._last_sent < _MIN_INTERVAL_S:
            return
        self._last_sent = now
        delay = _FIRST_BACKOFF_S
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                r = await self._client.post(self._url, json=body, timeout=10)
                if r.status_code < 500:
                    return
                reason = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                reason = type(exc).__name__
            log.warning("webhook %s for %s failed (%s), attempt %d/%d", event, body.get("id"),
                        reason, attempt, _ATTEMPTS)
            if attempt < _ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 2
