"""A prediction's `urls.stream`, read by the official `replicate` client's `stream` (and
over plain HTTP): its log lines as they come, each output file, an error, its end."""

import io
import json
import time

import httpx
import pytest
from PIL import Image

from tests.integration.conftest import (
    AUTH,
    BATCHED,
    CHECKED,
    CHECKED_PROMPT,
    FAST,
    decode,
    pixels,
)


def _events(url: str) -> list[tuple[str, str, str]]:
    """(event, id, data) of each event of a stream read whole over HTTP."""
    with httpx.stream("GET", url, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith(
            "text/event-stream")
        text = "".join(r.iter_text())
    events = []
    for block in text.strip().split("\n\n"):
        fields = [line.partition(": ") for line in block.split("\n") if line[:1] != ":"]
        if fields:
            kinds = {name: value for name, _, value in fields if name != "data"}
            data = "\n".join(value for name, _, value in fields if name == "data")
            events.append((kinds["event"], kinds["id"], data))
    return events


def test_the_official_client_streams_the_logs_as_they_come_then_each_file(rep, client):
    """`replicate.stream`: the seed line, the progress bar drawn anew as the steps run,
    the last line, then one output event per image (files with /generate's pixels for
    the seed) and `done`."""
    inp = {"prompt": "a red cube", "seed": 5, "num_outputs": 2, "width": 256, "height": 256,
           "num_inference_steps": 30}
    events = list(rep.stream(FAST, input=inp))
    kinds = [e.event.value for e in events]
    logs = [e.data for e in events if e.event.value == "logs"]
    assert kinds == ["logs"] * len(logs) + ["output", "output", "done"]
    assert logs[0] == "Using seed: 5" and logs[-1].startswith("Generated 2 image(s) in ")
    bars = [line for line in logs if "|" in line]
    assert bars[-1] == f"100%|{'█' * 20}| 30/30" and len(bars) >= 2  # drawn more than once
    steps = [int(bar.rsplit(" ", 1)[1].split("/")[0]) for bar in bars]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert len({e.id for e in events}) == len(events) and events[-1].data == "{}"
    direct = client.post("/generate", json={"prompt": "a red cube", "seed": 5,
                                            "num_outputs": 2, "width": 256, "height": 256,
                                            "steps": 30}).json()["images"]
    for event, expected in zip(events[-3:-1], direct, strict=True):
        # A URL under /files (the client makes file objects of https URLs only).
        streamed = Image.open(io.BytesIO(httpx.get(event.data).content))
        assert (pixels(streamed) == pixels(decode(expected))).all()


def test_a_stream_opened_after_the_end_replays_it(rep, base_url):
    """Read after the prediction finished: its log lines, its files and `done`, over
    plain HTTP with the event ids in order; an unknown prediction's stream is 404, and
one read without a key 401."""
    p = rep.models.predictions.create(model=FAST, input={"prompt": "x", "seed": 8})
    p.wait()
    assert p.urls["stream"] == f"{base_url}/v1/predictions/{p.id}/stream"
    events = _events(p.urls["stream"])
    assert [kind for kind, _, _ in events] == ["logs"] * 3 + ["output", "done"]
    assert [data for _, _, data in events[:3]] == p.logs.splitlines()
    assert [(data, ident) for _, ident, data in events[3:]] == [
        (p.output[0], "4"), ("{}", "5")]
    missing = httpx.get(f"{base_url}/v1/predictions/nope/stream", headers=AUTH)
    assert missing.status_code == 404
    assert httpx.get(p.urls["stream"]).status_code == 401  # a key, as for the prediction


def test_a_failed_prediction_streams_its_error_and_a_canceled_one_its_reason(rep):
    """The client raises the error event's message (the failure Replicate's models give
    when every image is flagged); a prediction canceled while queued ends with
    `done` giving the reason, after no output."""
    inp = {"prompt": CHECKED_PROMPT, "seed": 10, "num_outputs": 1}
    with pytest.raises(RuntimeError, match="NSFW content detected. Try running it again"):
        list(rep.stream(CHECKED, input=inp))
    p = rep.models.predictions.create(model=BATCHED, input={"prompt": "x", "seed": 3})
    time.sleep(0.3)  # the batched model waits 2 s for company: still queued
    rep.predictions.cancel(p.id)
    events = _events(p.urls["stream"])
    assert [kind for kind, _, _ in events] == ["logs"] * (len(events) - 1) + ["done"]
    assert json.loads(events[-1][2]) == {"reason": "canceled"}
