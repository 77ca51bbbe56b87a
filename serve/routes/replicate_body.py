"""Replicate's create body, and its `Prefer: wait` and `Cancel-After` headers."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serve.errors import InvalidField

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
_WAIT = re.compile(r"(?:^|[,;\s])wait(?:=(\d+))?(?:$|[,;\s])")


class PredictionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any] = Field(description="The model's inputs (see its version's schema)")
    version: str | None = None
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    stream: bool | None = None


def duration_s(value: str | None) -> float | None:
    """Seconds in a Cancel-After value: a number of seconds, or units like 1h30m, 45s,
    500ms. Raises InvalidField for anything else."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise InvalidField("Cancel-After", f"not a duration: {value!r}") from None
        seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if not 0 < seconds <= 86_400:
        raise InvalidField("Cancel-After", "must be between 0 and 24h")
    return seconds


def wait_seconds(prefer: str) -> float:
    match = _WAIT.search(prefer)
    if not match:
        return 0
    return float(min(60, max(1, int(match[1])))) if match[1] else 60.0
