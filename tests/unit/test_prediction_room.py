"""The bound on unfinished predictions (serve.predictions.check_room): per ingress
replica (`max_unfinished_predictions`, 503) and per key (`api_keys[]
.max_unfinished_predictions`, 429), counted as the replica's prediction tasks start and
end, however they end."""

import asyncio

import pytest

from serve.predictions import Prediction, PredictionRunner, PredictionsFull, check_room
from serve.rate_limits import RateLimited
from serve.state import MemoryStore


def test_a_key_and_the_replica_have_room_again_as_their_predictions_end():
    async def scenario():
        store = MemoryStore(60, 2**20)

        async def run(p):
            if p.input["hang"]:
                await asyncio.get_running_loop().create_future()
            if p.input["fail"]:
                raise RuntimeError("a failing run still ends")

        runner = PredictionRunner(store, "ingress-1", run)
        made = [Prediction(model="m/x", version="v", input={"hang": True, "fail": False},
                           private={"client": owner}) for owner in ("team-a", "team-a", "team-b")]
        for p in made:
            await runner.start(p)
        counts = [runner.running(), runner.running("team-a"), runner.running("team-c")]
        refusals = {}
        for name, args in {"key": ("team-a", 2, 10), "replica": ("team-c", None, 3),
                           "key-first": ("team-a", 2, 3)}.items():
            with pytest.raises((RateLimited, PredictionsFull)) as refused:
                check_room(runner, *args)
            refusals[name] = refused.value
        check_room(runner, "team-b", 2, 4)  # room for team-b, and for the replica
        await runner.cancel(made[0])  # its task is withdrawn
        failing = Prediction(model="m/x", version="v", input={"hang": False, "fail": True},
                             private={"client": "team-a"})
        await runner.start(failing)
        await asyncio.sleep(0.05)
        check_room(runner, "team-a", 2, 3)
        return counts, refusals, [runner.running(), runner.running("team-a")]

    counts, refusals, after = asyncio.run(scenario())
    assert counts == [3, 2, 0]
    assert refusals["key"].status == 429 and refusals["key"].retry_after_s == 5
    assert "team-a has 2 unfinished predictions" in refusals["key"].message
    assert refusals["replica"].status == 503 and refusals["replica"].retry_after_s == 5
    assert "runs 3 unfinished predictions" in refusals["replica"].message
    assert isinstance(refusals["key-first"], RateLimited)
    assert after == [2, 1]  # the canceled one and the failed one no longer count
