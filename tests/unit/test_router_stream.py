"""ModelRouter.generate_stream against a stand-in handle: what it counts and cancels."""

import asyncio
from types import SimpleNamespace

from serve.adapters import AdapterCatalog
from serve.config import default_config
from serve.router import ModelRouter
from serve.types import GenerationRequest


class _Stream:
    def __init__(self, events):
        self.events, self.cancelled = events, False

    def __aiter__(self):
        return self._events()

    async def _events(self):
        for event in self.events:
            yield event

    def cancel(self):
        self.cancelled = True


class _Handle:
    def __init__(self, stream):
        self.stream = stream
        self.generate_stream = SimpleNamespace(remote=lambda request: stream)

    def options(self, **_):
        return self


class _Counter:
    def __init__(self):
        self.calls = []

    def inc(self, value, tags):
        self.calls.append((value, tags))

    observe = inc


class _Metrics:
    def __init__(self):
        self.images, self.generation, self.failures = _Counter(), _Counter(), []
        self.usage = []

    def failed(self, model, kind):
        self.failures.append((model, kind))

    def used(self, client, model, images, share_s):
        self.usage.append((client, images, share_s))


def _router(stream):
    config = default_config()
    model = config.models[0].id
    metrics = _Metrics()
    router = ModelRouter(config, AdapterCatalog.from_dicts([]), {model: _Handle(stream)},
                         metrics)
    request = GenerationRequest.for_model(config.models[0], "a cat", seed=1, client="team-a")
    return router, request, metrics


def test_a_stream_left_after_its_result_counts_as_delivered_not_canceled():
    # Its 2 images shared a 3 s pipeline call with 2 others: half the call is its use.
    result = SimpleNamespace(images=[b"a", b"b"],
                             batch=SimpleNamespace(inference_ms=3000, images=4))
    stream = _Stream([("progress", 1, 2), ("result", result)])
    router, request, metrics = _router(stream)

    async def consume():
        async for event in router.generate_stream(request):
            if event[0] == "result":
                return event[1]  # as the Replicate route does: the generator is left open

    assert len(asyncio.run(consume()).images) == 2  # asyncio.run closes the generator
    assert metrics.failures == [] and stream.cancelled is False
    assert metrics.images.calls == [(2, {"model": request.model})]
    assert metrics.usage == [("team-a", 2, 1.5)]


def test_a_stream_closed_before_its_result_is_withdrawn_and_counted_canceled():
    stream = _Stream([("progress", 1, 2), ("result", SimpleNamespace(images=[b"a"]))])
    router, request, metrics = _router(stream)

    async def consume():
        events = router.generate_stream(request)
        assert (await anext(events))[0] == "progress"
        await events.aclose()

    asyncio.run(consume())
    assert metrics.failures == [(request.model, "canceled")] and stream.cancelled is True
    assert metrics.images.calls == []
