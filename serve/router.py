"""Routes a GenerationRequest to the deployment of its base model."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping

from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle

from serve.adapters import AdapterCatalog, AdapterSet, adapter_url, url_adapter_name
from serve.admission import Admission
from serve.auth import ApiKey
from serve.config import AtelierConfig, ModelConfig
from serve.errors import (
    AtelierError,
    InvalidField,
    ModelNotFound,
    OutOfMemory,
    Overloaded,
    Refused,
    ReplicaLost,
    TimedOut,
)
from serve.metrics import IngressMetrics
from serve.types import GenerationRequest, GenerationResult, SourceImage
from serve.urls import check_allowed_url

log = logging.getLogger("ray.serve.atelier.router")


class ModelRouter:
    """Resolves model ids and aliases, and sends requests to the right deployment."""

    def __init__(self, config: AtelierConfig, catalog: AdapterCatalog,
                 handles: Mapping[str, DeploymentHandle], metrics: IngressMetrics):
        self.config, self.catalog, self.metrics = config, catalog, metrics
        self._handles = dict(handles)
        self._by_name: dict[str, ModelConfig] = {}
        for model in config.models:
            for name in model.names:
                self._by_name[name] = model
        # Requests past what a model's replicas hold wait here, by priority (admission).
        # (From the replicas it starts with, its fewest if autoscaled; then those running:
        # see replicas_running.)
        self._admission = {
            m.id: Admission(m.id, m.replica_range[0] * m.max_ongoing_requests,
                            m.max_queued_requests,
                            lambda count, model=m.id: self.metrics.waiting(model, count))
            for m in config.models}

    def replicas_running(self, model: ModelConfig, count: int) -> None:
        """`model` runs `count` replicas now: let through what they hold (one request at
        least, which waits in Serve's queue for a replica to start)."""
        self._admission[model.id].resize(count * model.max_ongoing_requests)
        self.metrics.replicas(model.id, count, model.replica_range[0])

    def resolve(self, name: str | None, key: ApiKey | None = None) -> ModelConfig:
        """The model named by id or alias (for None, the first configured one), among
        those the API `key` may use.

        Raises ModelNotFound, for a model the key may not use too.
        """
        usable = self.usable(key)
        model = usable[0] if name is None and usable else self._by_name.get(name or "")
        if model is None or not any(m is model for m in usable):
            raise ModelNotFound(name or "(default)", [m.id for m in usable])
        return model

    def usable(self, key: ApiKey | None) -> list[ModelConfig]:
        """The configured models the API key may use (every one for None: no keys set)."""
        return [m for m in self.config.models if key is None or key.may_use(m.names)]

    def adapters_for(self, model: ModelConfig,
                     refs: list[tuple[str, float | None]]) -> AdapterSet:
        """The adapter set for (catalog name or file URL, scale or None for the default)
        references.

        Raises AdapterNotFound for a name outside the catalog, InvalidField("loras") for
        an adapter this model cannot use, a URL on a host outside lora_allowed_hosts, a
        name given twice, or too many adapters.
        """
        if len(refs) > model.limits.max_loras:
            raise InvalidField("loras", f"at most {model.limits.max_loras} adapters per request")
        pairs, urls = [], []
        for ref, scale in refs:
            url = adapter_url(ref)
            if url is not None:
                check_allowed_url(url, self.config.lora_allowed_hosts, "loras",
                                  "lora_allowed_hosts")
                name = url_adapter_name(url)
                urls.append((name, url))
                pairs.append((name, 1.0 if scale is None else scale))
                continue
            entry = self.catalog.get(ref)
            problem = entry.problem_with(model)
            if problem is not None:
                raise InvalidField("loras", problem)
            pairs.append((ref, entry.default_scale if scale is None else scale))
        try:
            return AdapterSet.of(pairs, urls)
        except ValueError as exc:
            raise InvalidField("loras", str(exc)) from None

    def _handle(self, request: GenerationRequest) -> DeploymentHandle:
        handle = self._handles[request.model]
        if request.adapters:
            handle = handle.options(multiplexed_model_id=request.adapters.key)
        return handle

    async def warm(self, model: ModelConfig) -> None:
        """Send one small request to `model` through its handle, counted nowhere, so that
        the handle's routing to the replicas and a replica's request path are set up
        before a client's first request (on a 2-core CPU that first request took ~50 ms
        longer around its pipeline call than the next ones). A model that draws from no
        text alone (FLUX.1 Fill, Canny, Depth) is sent a blank image."""
        d = model.defaults
        request = GenerationRequest.for_model(
            model, "warm-up", seed=0, num_inference_steps=1,
            source=SourceImage.warm_up(model.rules.modes, d.width, d.height))
        await self._handles[model.id].generate.remote(request)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[tuple]:
        """("progress", step, total) events while the request runs, then ("result", ...).

        Raises as `generate` does; closing the iterator early withdraws the request.
        """
        started, response, delivered = time.monotonic(), None, False
        try:
            async with self._admission[request.model].slot(request.priority):
                response = self._handle(request).options(
                    stream=True).generate_stream.remote(request)
                async for event in response:
                    if event[0] == "result":
                        if isinstance(event[1], Refused):
                            raise event[1].error
                        self._delivered(request, event[1], started)
                        delivered = True
                    yield event
        except BaseException as exc:
            if delivered:
                raise  # closed or cancelled after its result: nothing was withdrawn
            if response is not None and isinstance(exc, asyncio.CancelledError | GeneratorExit):
                response.cancel()  # withdrawn; cancelling a failed stream would re-raise
            raise self._failed(request, exc) from None

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run `request` (whose `model` is a resolved id) on its model's deployment.

        Raises Overloaded when the model's queue is full (of requests of no lower
        priority) or no replica is running, TimedOut past the model's request_timeout_s
        (waiting included). If the awaiting task is cancelled or times out, the request is
        withdrawn from the replica too.
        """
        started, response = time.monotonic(), None
        timeout_s = self.resolve(request.model).request_timeout_s
        try:
            async with asyncio.timeout(timeout_s), \
                    self._admission[request.model].slot(request.priority):
                response = self._handle(request).generate.remote(request)
                result = await response
            if isinstance(result, Refused):
                raise result.error
        except BaseException as exc:  # noqa: BLE001 - cancelled too: cancel the replica's work
            if response is not None and isinstance(exc, asyncio.CancelledError | TimeoutError):
                response.cancel()  # the replica stops waiting for (or computing) it
            if isinstance(exc, TimeoutError):
                exc = TimedOut(f"no result within {timeout_s:g}s (request_timeout_s)")
            raise self._failed(request, exc) from None
        self._delivered(request, result, started)
        return result

    def _delivered(self, request: GenerationRequest, result: GenerationResult,
                   started: float) -> None:
        # Images a safety checker withheld (black on /generate) are not delivered, though
        # their pipeline time is used.
        delivered = len(result.images) - sum(result.nsfw)
        if delivered:  # Ray's counters refuse 0
            self.metrics.images.inc(delivered, {"model": request.model})
            for control in request.controls:
                self.metrics.controlnet_images.inc(
                    delivered, {"model": request.model, "controlnet": control.name})
            if request.image_prompt is not None or request.extra_image_prompts:
                self.metrics.image_prompt_images.inc(delivered, {"model": request.model})
            if request.mode == "edit":
                self.metrics.edited_images.inc(delivered, {"model": request.model})
            if request.enlarges:
                self.metrics.upscaled_images.inc(
                    delivered, {"model": request.model, "upscaler": request.upscaler})
        b = result.batch
        self.metrics.used(request.client, request.model, delivered,
                          b.inference_ms / 1000 * len(result.images) / max(1, b.images))
        self.metrics.generation.observe(time.monotonic() - started, {"model": request.model})

    def _failed(self, request: GenerationRequest, exc: BaseException) -> BaseException:
        """Count the failure by kind; return the exception the caller should see."""
        kind, raised = _failure(request, exc)
        if kind is not None:
            self.metrics.failed(request.model, kind)
            log.info("request %s ended: %s", request.request_id, kind,
                     extra={"model": request.model, "kind": kind})
        return raised


def _failure(request: GenerationRequest, exc: BaseException) -> tuple[str | None, BaseException]:
    """(error kind to count or None, exception to raise) for a failed generation. Client
    errors (4xx) are counted by the ingress from their status."""
    if isinstance(exc, Overloaded):  # refused a place in the ingress's queue (admission)
        return "overload", exc
    if isinstance(exc, BackPressureError | DeploymentUnavailableError):
        return "overload", Overloaded(f"{request.model} is busy or has no running replica; "
                                      "retry later")
    if isinstance(exc, RayActorError):  # the replica's process or node went away
        return "replica_lost", ReplicaLost(f"the {request.model} replica running this request "
                                           "stopped; retry")
    if isinstance(exc, ReplicaLost):  # given up by its replica as unhealthy
        return "replica_lost", exc
    if isinstance(exc, asyncio.CancelledError | GeneratorExit | RequestCancelledError):
        return "canceled", exc
    if isinstance(exc, TimeoutError | TimedOut):
        return "timeout", exc
    if isinstance(exc, OutOfMemory):
        return "oom", exc
    if isinstance(exc, AtelierError) and exc.status < 500:
        return None, exc
    return "failed", exc
