"""How many replicas each model runs, followed by each ingress replica, so that it lets
through to the model what those replicas hold and no more (serve.admission): the rest wait
in its queue by priority while a lost replica is replaced or the autoscaler adds one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from ray import serve

from serve.router import ModelRouter

log = logging.getLogger("ray.serve.atelier.ingress")
FOLLOW_EVERY_S = 1.0  # (a new replica waits at most this long for requests)
# Replicas that take requests: a replica on a server being drained still serves.
SERVING = ("RUNNING", "PENDING_MIGRATION")


@dataclass(frozen=True)
class DeploymentState:
    """A deployment as Serve's controller describes it: its status (Serve's DeploymentStatus,
    a str), Serve's message on it, and how many of its replicas take requests."""
    status: str
    message: str
    running: int


def model_deployments(deployment_names: Mapping[str, str],
                      app_name: str | None = None) -> dict[str, DeploymentState | None]:
    """Serve's state of each model's deployment in app `app_name` (default: this
    replica's; None: no such deployment), by model id, from `deployment_names` (model id:
    deployment name). Blocks on Serve's controller.

    These are the details serve.status() is made from, read as the controller sends them:
    serve.status() validates them into Serve's schema first, which pickles each
    deployment's request router again: several ms of this process's CPU per deployment,
    every second (load.bench_status measures both)."""
    from ray.serve.context import _get_global_client  # no public accessor

    details = _get_global_client().get_serve_details()
    app_name = app_name or serve.get_replica_context().app_name
    app = details["applications"][app_name]["deployments"]
    return {model: _state(app[name]) if name in app else None
            for model, name in deployment_names.items()}


def _state(deployment: dict) -> DeploymentState:
    replicas = deployment.get("replicas", [])
    return DeploymentState(deployment["status"], deployment.get("message", ""),
                           sum(replica["state"] in SERVING for replica in replicas))


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
                router.replicas_running(model, deployment.running)
        await asyncio.sleep(FOLLOW_EVERY_S)
