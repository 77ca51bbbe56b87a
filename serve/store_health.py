"""Whether the prediction and file store answers this ingress replica, asked every few
seconds: exported as `atelier_store_available` (the AtelierStoreUnavailable alert) and
given by /healthz, with the error that Redis gave.

A store that does not answer leaves the ingress serving: /healthz stays 200, since every
replica shares the store and images answered inline (`/generate`, OpenAI's b64_json)
still generate, while what needs the store gets 503 `store_unavailable`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from serve.errors import StoreUnavailable
from serve.metrics import IngressMetrics
from serve.predictions import StateStore

ASK_EVERY_S = 5.0


@dataclass
class StoreHealth:
    kind: str  # "redis" or "memory"
    error: str | None = None  # Redis's own words when the last ask failed

    @property
    def available(self) -> bool:
        return self.error is None

    def as_json(self) -> dict:
        found = {"kind": self.kind, "state": "ok" if self.available else "unavailable"}
        return found | ({} if self.available else {"message": self.error})


async def ask(store: StateStore, health: StoreHealth, metrics: IngressMetrics) -> None:
    """Ask the store once; note the answer in `health` and the gauge."""
    try:
        await store.ping()
        health.error = None
    except StoreUnavailable as exc:
        cause = exc.__cause__ or exc  # (Redis's error, which StoreUnavailable wraps)
        health.error = str(cause) or type(cause).__name__
    metrics.store(health.available)


async def watch_store(store: StateStore, health: StoreHealth, metrics: IngressMetrics,
                      every_s: float = ASK_EVERY_S) -> None:
    """Ask the store every `every_s` for as long as the replica runs (a gauge that is not
    set again within Ray's report interval drops out of the export)."""
    while True:
        await ask(store, health, metrics)
        await asyncio.sleep(every_s)
