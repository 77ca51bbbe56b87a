"""The OpenAI event stream over a stand-in router: the events, errors and deadlines."""

import asyncio
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from serve.errors import Overloaded, TimedOut
from serve.routes.openai_stream import stream_images
from serve.types import BatchInfo, GenerationRequest, GenerationResult

GEN = GenerationRequest(model="a/b", prompt="x", width=64, height=32, num_inference_steps=4,
                        guidance_scale=5, seed=1, scheduler="K_EULER", partial_images=1)


class Router:
    def __init__(self, events, timeout_s=5.0):
        self.events, self.closed = events, False
        self.model = SimpleNamespace(request_timeout_s=timeout_s)

    def resolve(self, name):
        return self.model

    async def generate_stream(self, gen):
        try:
            for event in self.events:
                if isinstance(event, BaseException):
                    raise event
                if event == "stall":
                    await asyncio.sleep(60)
                yield event
        finally:
            self.closed = True


def _run(router):
    async def go():
        response = await stream_images(SimpleNamespace(router=router), GEN, "image_generation")
        return [chunk async for chunk in response.body_iterator]

    chunks = asyncio.run(go())
    return [(c.split(b"\n")[0].decode().removeprefix("event: "),
             json.loads(c.split(b"\n")[1].removeprefix(b"data: "))) for c in chunks]


def _result(image: bytes, nsfw: tuple[bool, ...] = ()) -> GenerationResult:
    return GenerationResult(images=[image], seeds=[1], media_type="image/png", width=64,
                            height=32, batch=BatchInfo("b", 1, 1, 0, 0), replica="r", nsfw=nsfw)


def test_partials_then_the_image_with_their_index_and_size():
    result = _result(b"final")
    events = _run(Router([("progress", 1, 4), ("partial", [b"p0"]), ("progress", 2, 4),
                          ("partial", [b"p1"]), ("result", result)]))
    assert [name for name, _ in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"]
    assert [d.get("partial_image_index") for _, d in events] == [0, 1, None]
    assert [d["b64_json"] for _, d in events] == ["cDA=", "cDE=", "ZmluYWw="]
    assert all(d["size"] == "64x32" and d["type"] == name for name, d in events)


def test_an_image_the_safety_checker_flagged_is_an_error_event_in_its_place():
    events = _run(Router([("progress", 1, 4), ("partial", [b"p0"]),
                          ("result", _result(b"black", (True,)))]))
    assert [name for name, _ in events] == ["image_generation.partial_image", "error"]
    assert events[1][1]["error"]["code"] == "content_policy_violation"
    assert "NSFW content detected" in events[1][1]["error"]["message"]


def test_an_error_after_the_start_is_an_error_event_in_openais_shape():
    router = Router([("progress", 1, 4), Overloaded("busy; retry later")])
    ((name, data),) = _run(router)
    assert name == "error" and data["error"]["message"] == "busy; retry later"
    assert data["error"]["code"] == "overloaded" and router.closed


def test_a_stream_past_the_models_timeout_ends_with_an_error_and_is_withdrawn():
    router = Router([("progress", 1, 4), "stall"], timeout_s=0.2)
    ((name, data),) = _run(router)
    assert name == "error" and "request_timeout_s" in data["error"]["message"]
    assert router.closed


def test_a_refusal_before_the_first_event_is_raised_for_a_plain_answer():
    with pytest.raises(Overloaded):
        _run(Router([Overloaded("busy")]))
    with pytest.raises(TimedOut):
        _run(Router(["stall"], timeout_s=0.1))


def test_the_completed_image_says_its_own_size_when_larger_than_the_partials():
    """A hires pass or `upscale` answers a larger image than the first pass's partials."""
    larger = replace(_result(b"final"), width=128, height=64)
    events = _run(Router([("progress", 1, 4), ("partial", [b"p0"]), ("result", larger)]))
    assert [d["size"] for _, d in events] == ["64x32", "128x64"]
