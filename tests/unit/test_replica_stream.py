"""A replica's `generate_stream` when its client goes away mid-call: nothing it started is
left pending (a task left behind is destroyed later by the garbage collector, which may
run on another thread than the replica's event loop)."""

import asyncio
from types import SimpleNamespace

from serve.types import GenerationRequest

REQUEST = GenerationRequest(model="a/b", prompt="a red cube", width=64, height=64,
                            num_inference_steps=2, guidance_scale=7.5, seed=1,
                            scheduler="K_EULER")


def test_a_stream_dropped_while_its_call_runs_leaves_no_task_pending():
    from deployments.model import ModelDeployment

    async def scenario():
        call_ends = asyncio.Event()  # never set: the client leaves before the call ends

        async def generate(request, on_step, on_preview):  # a call still denoising
            on_step(1, 2)
            await call_ends.wait()

        replica = SimpleNamespace(_generate=generate)
        stream = ModelDeployment.func_or_class.generate_stream(replica, REQUEST)
        first = await anext(stream)
        waiting = asyncio.ensure_future(anext(stream))  # for the next event
        await asyncio.sleep(0.05)
        waiting.cancel()  # the client went away
        await asyncio.gather(waiting, return_exceptions=True)
        await asyncio.sleep(0)  # let the cancelled tasks finish
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return first, waiting.cancelled(), [t.get_coro().__qualname__ for t in others
                                            if not t.done()]

    first, cancelled, pending = asyncio.run(scenario())
    assert first == ("progress", 1, 2) and cancelled
    assert pending == []
