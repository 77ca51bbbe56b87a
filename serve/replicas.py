"""How many replicas each model runs, followed by each ingress replica, so that it lets
through to the model what those replicas hold and no more (serve.admission): the rest wait
in its queue by priority while a lost replica is replaced or the autoscaler adds one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from ray import serve

from serve.router import ModelRouter

log = logging.getLogger("ray.serve.atelier.ingress")
FOLLOW_EVERY_S = 1.0  # (a new replica waits at most this long for requests)
# Replicas that take requests: a replica on a server being drained still serves.
SERVING = ("RUNNING", "PENDING_MIGRATION")


def model_deployments(deployment_names: Mapping[str, str]) -> dict:
    """Serve's status of each model's deployment in this replica's app (None: no such
    deployment), by model id, from `deployment_names` (model id: deployment name). Blocks
    on Serve's controller."""
    app = serve.status().applications[serve.get_replica_context().app_name]
    return {model: app.deployments.get(name) for model, name in deployment_names.items()}


def running(deployment) -> int:
    """The replicas of a deployment as model_deployments gives it that take requests."""
    states = deployment.replica_states if deployment else {}
    return sum(states.get(state, 0) for state in SERVING)


async def follow_replicas(router: ModelRouter, deployment_names: Mapping[str, str]) -> None:
    """Keeps the router's admission of each model to its running replicas."""
    models = list(router.config.models)
    names = {m.id: deployment_names[m.id] for m in models}
    while models:
        try:
            deployments = await asyncio.to_thread(model_deployments, names)
        except Exception as exc:  # noqa: BLE001 (kept as it was until the next look)
            log.info("reading the models' replicas failed: %s", exc)
            deployments = {}
        for model in models:
            if (deployment := deployments.get(model.id)) is not None:
                router.replicas_running(model, running(deployment))
        await asyncio.sleep(FOLLOW_EVERY_S)
