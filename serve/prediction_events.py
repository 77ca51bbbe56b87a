"""A prediction as Replicate streams one (`urls.stream`, read by the official clients'
`replicate.stream` and `Prediction.stream`): server-sent events of its new log lines
(`logs`), its output files (`output`, one each), its error (`error`) and its end (`done`:
`{}`, or the reason it ended otherwise). The events follow the stored prediction, so any
ingress replica can stream a prediction another one runs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from serve.predictions import Prediction

POLL_S = 0.1  # how often the stored prediction is read again
KEEP_ALIVE_S = 15.0  # a comment after this long without an event, for proxies' idle limits

log = logging.getLogger("ray.serve.atelier.predictions")


def new_log_lines(before: str, after: str) -> list[str]:
    """The lines of `after` from the first that differs from `before`'s: lines added, and
    the progress bar's line each time it is drawn anew (it replaces the last line)."""
    old, new = before.splitlines(), after.splitlines()
    same = 0
    while same < min(len(old), len(new)) and old[same] == new[same]:
        same += 1
    return new[same:]


def event(kind: str, data: str, event_id: int) -> bytes:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {kind}\nid: {event_id}\n{lines}\n".encode()


def ending(prediction: Prediction) -> list[tuple[str, str]]:
    """The events that end a finished prediction's stream."""
    if prediction.status == "succeeded":
        outputs = prediction.output if isinstance(prediction.output, list) else [
            prediction.output]
        return [("output", url) for url in outputs] + [("done", "{}")]
    if prediction.status == "failed":
        return [("error", prediction.error or "the prediction failed"),
                ("done", json.dumps({"reason": "error"}))]
    return [("done", json.dumps({"reason": prediction.status}))]


async def prediction_events(prediction: Prediction,
                            load: Callable[[], Awaitable[Prediction | None]],
                            poll_s: float = POLL_S) -> AsyncIterator[bytes]:
    """The stream of `prediction` (as stored when asked), reading it again with `load`
    until it has finished. A store that cannot be reached is read again at the next
    poll; a prediction no longer kept (expired) ends the stream with an error."""
    logs, sent, quiet_since = "", 0, time.monotonic()
    while True:
        kinds = [("logs", line) for line in new_log_lines(logs, prediction.logs)]
        logs = prediction.logs
        if prediction.done:
            kinds += ending(prediction)
        for kind, data in kinds:
            sent += 1
            yield event(kind, data, sent)
        if prediction.done:
            return
        if kinds:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= KEEP_ALIVE_S:
            quiet_since = time.monotonic()
            yield b": keep-alive\n\n"
        await asyncio.sleep(poll_s)
        try:
            stored = await load()
        except Exception:  # the store is unreachable for now: read it again next time
            log.warning("prediction %s: its stream could not read the store", prediction.id,
                        exc_info=True)
            continue
        prediction = stored or replace(prediction, status="failed",  # expired: no end
                                       error="the prediction is no longer kept")
