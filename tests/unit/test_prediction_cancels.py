"""How a prediction's run ends on a cancel (serve.routes.replicate_runs.run_prediction),
with a model replica that reports steps for as long as it is let run."""

import asyncio
from types import SimpleNamespace

from serve.predictions import Prediction, PredictionRunner
from serve.routes.replicate_runs import run_prediction

STEPS = 10_000


async def _steps(gen):
    for step in range(STEPS):
        yield ("progress", step, STEPS)
        await asyncio.sleep(0.01)


def test_a_run_that_sees_a_cancel_saves_the_prediction_canceled(store):
    """The canceller records the cancel and then saves the prediction canceled; where that
    save fails (the store lost between the two calls), the run that notices the cancel
    still ends it in the store, rather than leaving it processing for replicas to adopt
    again and again."""
    async def scenario():
        state = SimpleNamespace(store=store, prepared={}, router=SimpleNamespace(
            config=SimpleNamespace(prediction_retry_s=600), generate_stream=_steps))
        state.predictions = PredictionRunner(store, "a", lambda p: run_prediction(state, p))
        p = Prediction(model="m/x", version="v", input={},
                       private={"seed": 5, "base": "http://atelier", "client": "team-a"})
        state.prepared[p.id] = SimpleNamespace(num_inference_steps=STEPS, seed=5)
        await state.predictions.start(p)
        await asyncio.sleep(0.4)
        before = (await store.load(p.id)).status
        await store.request_cancel(p.id)  # (and no save of it canceled)
        await asyncio.sleep(0.4)
        after = await store.load(p.id)
        return before, after, await store.orphans(), await store.hold("team-a", "next", 1)

    before, after, orphans, room = asyncio.run(scenario())
    assert before == "processing"
    assert after.status == "canceled" and after.completed_at and after.output is None
    assert "Using seed: 5" in after.logs
    assert orphans == [] and room
