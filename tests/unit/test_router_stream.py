"""ModelRouter against a stand-in handle: what it counts, cancels and raises."""

import asyncio
import pickle
from types import SimpleNamespace

import pytest

from serve.adapters import AdapterCatalog, AdapterInvalid
from serve.config import default_config, parse_config
from serve.errors import InvalidField, ModelNotFound, Refused, TimedOut, TooLarge
from serve.metrics import IngressMetrics
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
        self.usage, self.waits = [], []

    def failed(self, model, kind):
        self.failures.append((model, kind))

    def used(self, client, model, images, share_s):
        self.usage.append((client, images, share_s))

    def waiting(self, model, count):
        self.waits.append(count)


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
    result = SimpleNamespace(images=[b"a", b"b"], nsfw=(),
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


def test_images_a_safety_checker_withheld_are_not_delivered_but_their_time_is_used():
    # 3 images of a 2 s call of 4; the first and last flagged (black on /generate).
    result = SimpleNamespace(images=[b"a", b"b", b"c"], nsfw=(True, False, True),
                             batch=SimpleNamespace(inference_ms=2000, images=4))
    router, request, metrics = _router(None)
    router._handles[request.model].generate = SimpleNamespace(
        remote=lambda request: _Response(result))
    assert asyncio.run(router.generate(request)) is result
    assert metrics.images.calls == [(1, {"model": request.model})]
    assert metrics.usage == [("team-a", 1, 1.5)]
    result.nsfw = (True, True, True)
    asyncio.run(router.generate(request))
    assert metrics.images.calls == [(1, {"model": request.model})]  # none more
    assert metrics.usage[1:] == [("team-a", 0, 1.5)] and metrics.failures == []
    IngressMetrics().used("team-a", request.model, 0, 1.5)  # Ray's counters refuse inc(0)


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


class _Response:
    """What `handle.generate.remote` returns: awaited for the replica's answer."""

    def __init__(self, answer):
        self.answer = answer

    def __await__(self):
        yield from asyncio.sleep(0).__await__()
        return self.answer

    def cancel(self):
        raise AssertionError("a refused request has nothing to withdraw")


def test_a_replicas_refusal_is_raised_as_its_error_and_not_counted_a_failure():
    # The replica answers a client error instead of raising it through Serve; it crossed
    # a process boundary, so it arrives pickled.
    refused = pickle.loads(pickle.dumps(Refused(
        AdapterInvalid("downloading the LoRA at http://h/x.safetensors gave HTTP 404"))))
    stream = _Stream([("result", refused)])
    router, request, metrics = _router(stream)
    router._handles[request.model].generate = SimpleNamespace(
        remote=lambda request: _Response(refused))

    async def consume():
        async for _ in router.generate_stream(request):
            raise AssertionError("a refused stream yields nothing")

    for attempt in (consume, lambda: router.generate(request)):
        with pytest.raises(AdapterInvalid, match="gave HTTP 404") as raised:
            asyncio.run(attempt())
        assert raised.value.status == 422
    assert metrics.failures == [] and metrics.images.calls == [] and not stream.cancelled


def test_errors_keep_their_fields_across_processes():
    for error in (InvalidField("loras", "no such adapter", "query"),
                  TooLarge("image", "over 20 MB"), ModelNotFound("a/b", ["c/d"])):
        copy = pickle.loads(pickle.dumps(error))
        assert (type(copy), copy.args, copy.status) == (type(error), error.args, error.status)
        assert copy.detail() == error.detail()
    assert copy.detail() == "model 'a/b' is not served here; served: c/d"



def test_waiting_for_a_place_counts_towards_the_timeout_and_higher_priorities_go_first():
    """A model whose one replica holds one request, its place taken: a request waits at
    the ingress, and past request_timeout_s times out without reaching the replica; of
    two waiting, the higher priority is sent first once the place frees."""
    config = parse_config({"models": [{
        "id": "a/b", "embedded": "tiny-sdxl", "max_ongoing_requests": 1,
        "max_queued_requests": 2, "batching": {"max_batch_size": 1},
        "request_timeout_s": 0.3}]})
    model, sent, metrics = config.models[0], [], _Metrics()
    result = SimpleNamespace(images=[b"a"], nsfw=(False,),
                             batch=SimpleNamespace(inference_ms=10, images=1))

    def remote(request):
        sent.append(request.seed)
        return _Response(result)

    router = ModelRouter(config, AdapterCatalog.from_dicts([]), {
        model.id: SimpleNamespace(generate=SimpleNamespace(remote=remote))}, metrics)

    def request(seed, priority=0):
        return GenerationRequest.for_model(model, "x", seed=seed, priority=priority)

    async def run():
        taken, release = asyncio.Event(), asyncio.Event()

        async def hold():  # another request's place on the replica
            async with router._admission[model.id].slot():
                taken.set()
                await release.wait()

        holder = asyncio.create_task(hold())
        await taken.wait()
        with pytest.raises(TimedOut):
            await router.generate(request(1))
        assert sent == [] and metrics.waits == [1, 0]
        low = asyncio.create_task(router.generate(request(2)))
        high = asyncio.create_task(router.generate(request(3, priority=5)))
        await asyncio.sleep(0.05)
        assert sent == [] and metrics.waits[-1] == 2
        release.set()
        await asyncio.gather(holder, low, high)

    asyncio.run(run())
    assert sent == [3, 2] and metrics.failures == [(model.id, "timeout")]
    assert metrics.waits[-1] == 0


def test_warming_sends_each_model_a_call_it_takes():
    """A model that draws from no text alone (FLUX.1 Fill, Canny) is warmed with a blank
    image to fill or follow, not a text-to-image call it would refuse."""
    from serve.config import AtelierConfig, ModelConfig

    config = AtelierConfig(models=[
        ModelConfig(id="a/sdxl", embedded="tiny-sdxl"),
        ModelConfig(id="a/fill", family="flux", embedded="tiny-flux-fill", fill=True),
        ModelConfig(id="a/canny", family="flux", embedded="tiny-flux-canny", canny=True)])
    sent = {}

    class Warmed:
        def __init__(self, model_id):
            self.generate = SimpleNamespace(
                remote=lambda request: _Response(sent.setdefault(model_id, request)))

    router = ModelRouter(config, AdapterCatalog.from_dicts([]),
                         {m.id: Warmed(m.id) for m in config.models}, _Metrics())
    for model in config.models:
        asyncio.run(router.warm(model))
    assert {m: r.mode for m, r in sent.items()} == {
        "a/sdxl": "txt2img", "a/fill": "inpaint", "a/canny": "control"}
    fill = sent["a/fill"]
    assert fill.source.mask == b"\xff" * (fill.width * fill.height)  # all of it filled
    assert fill.source.rgb == bytes(fill.width * fill.height * 3)
    assert all(r.num_inference_steps == 1 and r.seed == 0 for r in sent.values())
