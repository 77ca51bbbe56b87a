"""Wiring: the ingress deployment and the app builder that `serve run`/`serve deploy` use.

    serve run serve_config.yaml              # the embedded default
    args: {config: path/to/atelier.yaml}     # real models (see README)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.lora_downloads import DownloadSettings
from deployments.model import ModelDeployment
from serve import gc_pauses
from serve.access import install_access
from serve.adapters import AdapterCatalog
from serve.auth import configured_keys, webhook_secrets
from serve.body_limit import install_body_limit
from serve.config import AtelierConfig, ModelConfig, app_config
from serve.context import ingress
from serve.cors import install_cors
from serve.disconnects import install_disconnects
from serve.hardware import gpu_types
from serve.http_errors import install_error_handlers
from serve.images import ImageFetcher
from serve.metrics import IngressMetrics, gc_pause_histogram
from serve.predictions import PredictionRunner
from serve.redis_state import RedisStore
from serve.replicas import follow_replicas
from serve.router import ModelRouter
from serve.routes import (
    files,
    generate,
    loras,
    models,
    openai_images,
    replicate,
    replicate_account,
    replicate_collections,
    replicate_managed,
    uploads,
)
from serve.routes.replicate_runs import run_prediction
from serve.state import MemoryStore
from serve.store_health import StoreHealth, watch_store
from serve.urls import outbound_client
from serve.versions import upscaling_version, version_id
from serve.webhooks import key_secret, new_secret, webhook_secret_from_env

log = logging.getLogger("ray.serve.atelier.ingress")
_DRAIN_MARGIN_S = 10

api = FastAPI(title="Atelier", description="Self-hosted image generation.",
              version="0.1.0")
api.include_router(generate.router)
api.include_router(models.router)
api.include_router(loras.router)
api.include_router(openai_images.router)
api.include_router(replicate.router)
api.include_router(replicate_account.router)
api.include_router(replicate_collections.router)
api.include_router(replicate_managed.router)
api.include_router(files.router)
api.include_router(uploads.router)
install_error_handlers(api)
# An overlong body is refused before anything reads it; outermost, the key and rate
# checks, so that refusal too is counted and names the ingress replica.
install_body_limit(api, lambda: ingress().router.config.max_body_bytes)
install_access(api, ingress)
# A browser's preflight carries no key, and refusals need the headers too.
install_cors(api, lambda: ingress().router.config.cors_allowed_origins)
# Outermost: every layer reads a client that left as a disconnect.
install_disconnects(api)


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP front: validates, converts to GenerationRequest, routes to model deployments."""

    def __init__(self, config: dict, adapters: list[dict], versions: dict[str, str],
                 handles: Mapping[str, DeploymentHandle], deployment_names: Mapping[str, str]):
        cfg = AtelierConfig.model_validate(config)
        self.metrics = IngressMetrics()
        self.router = ModelRouter(cfg, AdapterCatalog.from_dicts(adapters), handles,
                                  self.metrics)
        for model in cfg.models:  # the gauge reads 0 from the start, not nothing
            self.metrics.waiting(model.id, 0)
        self.store = (RedisStore(cfg.redis_url, cfg.file_ttl_s) if cfg.redis_url else
                      MemoryStore(cfg.file_ttl_s, cfg.file_store_mb * 2**20))
        self.store_health = StoreHealth("redis" if cfg.redis_url else "memory")
        self._watching = asyncio.get_running_loop().create_task(
            watch_store(self.store, self.store_health, self.metrics))
        self.api_keys = configured_keys(cfg.api_keys)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.predictions = PredictionRunner(
            self.store, self.replica, lambda p: run_prediction(self, p),
            refused=lambda key: self.metrics.rate_limited.inc(1, {"key": key}))
        # Serve runs the constructor on the replica's event loop.
        self._keeper = asyncio.get_running_loop().create_task(
            self.predictions.keep(self.metrics.unfinished_predictions))
        self._warming = asyncio.get_running_loop().create_task(self._warm_models(cfg))
        self.versions = dict(versions)
        self.prepared: dict = {}
        self.http_client = outbound_client()
        self.images = ImageFetcher(cfg.image_allowed_hosts, self.http_client, self.store)
        if not self.api_keys:
            log.warning("no API keys are set: anyone who reaches this port can generate")
        self.deployment_names = dict(deployment_names)
        self._following = asyncio.get_running_loop().create_task(
            follow_replicas(self.router, self.deployment_names))
        self.started_at = int(time.time())
        self._webhook_secret = cfg.webhook_secret or webhook_secret_from_env()
        self._key_secrets = webhook_secrets(self.api_keys)
        gc_pauses.settle()  # later collections scan only what serving makes
        gc_pauses.watch(gc_pause_histogram())

    async def _warm_models(self, cfg: AtelierConfig) -> None:
        """Each model's request path through this replica, warmed once its replicas
        answer (see ModelRouter.warm); a failure only means a colder first request."""
        for model in cfg.models:
            try:
                await self.router.warm(model)
            except Exception as exc:  # noqa: BLE001 (it is only a warm-up)
                log.info("warming the path to %s failed: %s", model.id, type(exc).__name__)

    async def webhook_secret(self, owner: str) -> str:
        """The secret that signs the webhooks of the API key named `owner` ("open" on a
        server without keys): the key's own, else one derived from the master secret (the
        configured one, else the one kept in the store, made once)."""
        if owner in self._key_secrets:
            return self._key_secrets[owner]
        if self._webhook_secret is None:
            self._webhook_secret = await self.store.shared_secret("webhook", new_secret)
        return self._webhook_secret if owner == "open" else \
            key_secret(self._webhook_secret, owner)

    async def __del__(self):
        """Serve calls this when the replica stops (redeploy, scale-down), after its HTTP
        requests have drained: unfinished predictions go to another replica at once."""
        self._keeper.cancel()
        self._warming.cancel()
        self._following.cancel()
        self._watching.cancel()
        await self.predictions.hand_over()


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Build the Serve application from `args["config"]` (a YAML path), an inline
    `args["atelier"]` mapping, or the embedded default when neither is given.

    Raises ConfigError naming the failing field.
    """
    config = app_config(args or {})
    config.check_paths()
    catalog = _scan_adapters(config).to_dicts()
    has_gpus = _cluster_has_gpus()
    _warn_of_missing_gpu_types(config.models, has_gpus)
    bound = {m.id: _model_app(m, config, catalog, has_gpus) for m in config.models}
    names = {m.id: _deployment_name(m) for m in config.models}
    versions = {m.id: version_id(m, config.cache_dir) for m in config.models}
    versions |= {alias: upscaling_version(versions[m.id], alias) for m in config.models
                 for alias in m.upscaling_aliases}
    # A replica being replaced (redeploy, scale-down) first finishes the synchronous
    # requests it holds, which may take up to the longest request_timeout_s.
    drain_s = max(m.request_timeout_s for m in config.models) + _DRAIN_MARGIN_S
    return Ingress.options(
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=drain_s,
    ).bind(config.model_dump(mode="json"), catalog, versions, bound, names)


def _deployment_name(model: ModelConfig) -> str:
    return f"model-{model.slug}"


def _scan_adapters(config: AtelierConfig) -> AdapterCatalog:
    folders = []
    for folder in config.lora_folders:
        path = folder.path
        if folder.embedded is not None:
            from deployments.tiny import ensure_demo_loras  # builds with torch, once

            path = ensure_demo_loras(folder.embedded, config.cache_dir)
        folders.append((path, folder.base, folder.default_scale))
    return AdapterCatalog.scan(folders)


def _model_app(model: ModelConfig, config: AtelierConfig, catalog: list[dict],
               has_gpus: bool) -> serve.Application:
    gpus = model.gpu_share if _on_gpu(model, has_gpus) else 0
    downloads = DownloadSettings(
        config.cache_dir / "lora-downloads", tuple(config.lora_allowed_hosts),
        config.lora_download_max_mb * 2**20,
        config.lora_download_cache_mb * 2**20) if config.lora_allowed_hosts else None
    scaling = ({"num_replicas": model.replicas} if model.autoscaling is None else
               {"autoscaling_config": model.autoscaling.ray_config(
                   model.batching.max_batch_size)})
    return ModelDeployment.options(
        name=_deployment_name(model),
        **scaling,
        max_ongoing_requests=model.max_ongoing_requests,
        # The queue proper is each ingress's (serve.admission), which lets through at most
        # what the replicas hold; Serve's own holds those a replica has not yet taken back
        # (one just answered may still count as busy there for a moment). Its count is
        # loose (requests being assigned count as queued), so it sets no limit of its own.
        max_queued_requests=-1,
        ray_actor_options=_actor_options(model, gpus),
        health_check_period_s=model.health_check_period_s,
        health_check_timeout_s=model.health_check_timeout_s,
        graceful_shutdown_timeout_s=model.request_timeout_s + _DRAIN_MARGIN_S,
    ).bind(model.model_dump(mode="json"), str(config.cache_dir), catalog, downloads,
           config.content_credentials and config.content_credentials.model_dump(mode="json"))


def _actor_options(model: ModelConfig, gpus: float) -> dict:
    """A replica's Ray resources: its GPU share (on the GPU type asked for, if one)."""
    options = {"num_gpus": gpus, "num_cpus": model.num_cpus}
    if gpus and model.accelerator_type:
        options["accelerator_type"] = model.accelerator_type
    return options


def _warn_of_missing_gpu_types(models: list[ModelConfig], has_gpus: bool) -> None:
    """Log each model on GPUs pinned to a GPU type that no alive server has now: its
    replicas wait for one (a server may still join)."""
    if not ray.is_initialized():
        return
    present = gpu_types(ray.cluster_resources())
    for model in models:
        wanted = model.accelerator_type if _on_gpu(model, has_gpus) else None
        if wanted and wanted not in present:
            log.warning("%s: no server of the cluster has %s GPUs now (its GPU types: %s); "
                        "its replicas wait for one", model.id, wanted,
                        ", ".join(sorted(present)) or "none")


def _on_gpu(model: ModelConfig, has_gpus: bool) -> bool:
    return model.device == "cuda" or (model.device == "auto" and has_gpus)


def _cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
