"""The model deployment: one replica per GPU, loaded and warmed up before it is healthy."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import ray
from PIL.Image import Image
from ray import serve

from deployments.batcher import Batcher, PreviewListener, StepListener
from deployments.lora_downloads import AdapterDownloads, DownloadSettings
from deployments.outputs import Outputs
from deployments.replica_adapters import ReplicaAdapters
from deployments.safety import SafetyChecker
from serve import gc_pauses
from serve.adapters import AdapterCatalog, AdapterSet
from serve.config import ModelConfig
from serve.errors import AtelierError, InferenceFailed, Refused, ReplicaLost
from serve.metrics import ModelMetrics, gc_pause_histogram
from serve.types import MEDIA_TYPES, BatchInfo, GenerationRequest, GenerationResult, SourceImage

log = logging.getLogger("ray.serve.atelier.model")
_MAX_CONSECUTIVE_FAILURES = 3
_PROGRESS_EVERY_S = 0.2


@serve.deployment
class ModelDeployment:
    """Serves one base model. `generate` takes a GenerationRequest, returns its result.

    Construction loads the pipeline (local files only) and runs one warm-up call, so the
    replica is reported healthy only once a request would run at full speed.
    """

    def __init__(self, model: dict, cache_dir: str, adapters: list[dict],
                 downloads: DownloadSettings | None = None, credentials: dict | None = None):
        from deployments.engines import create_engine

        self.cfg = ModelConfig.model_validate(model)
        catalog = {n: e for n, e in AdapterCatalog.from_dicts(adapters).entries.items()
                   if e.problem_with(self.cfg) is None}
        downloads = downloads and AdapterDownloads(downloads)
        started = time.monotonic()
        self.engine = create_engine(self.cfg, Path(cache_dir),
                                    catalog if catalog or downloads else None)
        self.checker = self.cfg.safety_checker and SafetyChecker(
            self.cfg.safety_checker.path, self.engine.device, self.engine.dtype)
        self.outputs = Outputs(self.cfg, self.checker, credentials)
        self.load_s = time.monotonic() - started
        # One thread: pipeline calls never overlap on a replica. Prompts are encoded on
        # another as requests arrive, and images compressed on others, all while the
        # running call denoises.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pipeline")
        self._prompts = ThreadPoolExecutor(1, thread_name_prefix="prompts")
        self._workers = ThreadPoolExecutor(min(8, os.cpu_count() or 1),
                                           thread_name_prefix="encode-read")
        started = time.monotonic()
        self._warm_up()
        self.warmup_s = time.monotonic() - started
        self.metrics = ModelMetrics(self.cfg.id, self.cfg.batching.max_batch_size)
        self.outputs.on_flagged = self.metrics.safety_flagged.inc
        self._failures = 0
        self._rewrites = self.engine.adapters.rewrites  # the warm-up's are not counted
        self.replica = serve.get_replica_context().replica_id.unique_id
        runtime = ray.get_runtime_context()
        self.node = runtime.get_node_id()
        self.gpus = tuple(str(g) for g in runtime.get_accelerator_ids().get("GPU", ()))
        self.batcher = Batcher(self._run_batch, self.cfg.batching.max_batch_size,
                               self.cfg.batching.wait_ms / 1000, name=self.replica,
                               on_depth=self.metrics.queue_depth.set,
                               idle_s=self.cfg.keep_warm_s, on_idle=self._keep_warm,
                               max_held=self.cfg.max_loaded_adapters)
        self._refresh_gauges()
        self.adapters = ReplicaAdapters(self.cfg, self.engine.adapters, catalog, downloads,
                                        self._workers, self._executor)
        # What start-up made stays; requests should not wait for collections to scan it.
        settled = gc_pauses.settle()
        gc_pauses.watch(gc_pause_histogram())
        self._log_ready(settled)

    def _log_ready(self, settled: dict) -> None:
        """One log line: the replica is ready, on which device, with which weights, and
        how long loading, the warm-up and settling the heap (`gc_pauses.settle`) took."""
        facts = self.engine.describe()
        merged, vae = facts["merged_loras"], facts["vae"]
        log.info("%s ready on %s (weights: %s%s%s%s): load %.2fs, warm-up %.2fs, %d objects "
                 "frozen in %.2fs", self.cfg.id, facts["device"],
                 ", ".join(f"{part} {dtype}" for part, dtype in facts["weights"].items()),
                 f"; merged LoRAs: {', '.join(merged)}" if merged else "",
                 f"; VAE from {vae}" if vae else "",
                 "; tiled VAE" if facts["vae_tiling"] else "",
                 self.load_s, self.warmup_s, settled["frozen"], settled["seconds"])

    def _warm_up(self) -> None:
        """The warm-up calls, each on the thread its kind of work runs on when serving:
        the pipeline calls on the pipeline thread, a prompt's encoding on the prompt
        thread, the safety checker on an encoding thread. A thread's first work on the
        device pays for its own set-up (e.g. its cuBLAS handle), which a first request
        would otherwise wait for."""
        request = self._warm_request(self.cfg.warmup_steps)
        self._executor.submit(self.engine.warm_up, request,
                              self.cfg.batching.max_batch_size).result()
        self._prompts.submit(self.engine.prepare,
                             replace(request, prompt="a prompt not seen before")).result()
        if self.checker:
            self._workers.submit(self.checker.warm_up, request.width, request.height).result()

    def _warm_request(self, steps: int) -> GenerationRequest:
        """Text-to-image at the model's defaults; for a model without it (FLUX.1 Fill,
        Canny), its own kind of call on a blank image."""
        d = self.cfg.defaults
        source = SourceImage.warm_up(self.cfg.rules.modes, d.width, d.height)
        return GenerationRequest(
            model=self.cfg.id, prompt="warm-up", width=d.width, height=d.height,
            num_inference_steps=steps, guidance_scale=d.guidance_scale, seed=0,
            scheduler=self.cfg.default_scheduler, source=source)

    async def _keep_warm(self) -> None:
        """After `keep_warm_s` without a request: one short call on the pipeline thread
        (the batcher runs none meanwhile), so the device's clocks and caches do not go
        cold before the next request."""
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self.engine.generate, [self._warm_request(1)])
        except Exception:
            log.exception("%s keep-warm call failed", self.cfg.id)
            return
        self.metrics.keep_warm.inc()
        self._count_rewrites()

    async def generate(self, request: GenerationRequest) -> GenerationResult | Refused:
        """Run the request; a client error (one of its adapters cannot be used) is answered
        as Refused. Raises InferenceFailed if the pipeline fails on it alone."""
        try:
            return await self._generate(request)
        except AtelierError as exc:
            if (refused := _refusal(exc)) is None:
                raise
            return refused

    async def _generate(self, request: GenerationRequest,
                        on_step: StepListener | None = None,
                        on_preview: Callable[[list[Image]], None] | None = None,
                        ) -> GenerationResult:
        """Queue the request in the batcher and return its encoded images; `on_step` hears
        its call's progress, `on_preview` gets its partial images (`partial_images`)."""
        collected = gc_pauses.paused_s()
        self.engine.check_request(request)  # refused alone, before it joins a batch
        if request.adapters:
            await self._hold_adapters(request.adapters)
        queued = _Queued(request, self._prepare(request))
        outcome = await self.batcher.submit(queued, self.engine.batch_key(request),
                                            request.num_outputs, on_step, on_preview,
                                            frozenset(request.adapters.names),
                                            request.priority)
        self.metrics.queue_wait.observe(outcome.queue_s)
        images, nsfw = await asyncio.get_running_loop().run_in_executor(
            self._workers, self.outputs.finish, request, outcome.result)
        b = BatchInfo(batch_id=outcome.batch_id, images=outcome.batch_images,
                      requests=outcome.batch_requests, queue_ms=outcome.queue_s * 1000,
                      inference_ms=outcome.run_s * 1000)
        return GenerationResult(images=images, seeds=request.seeds,
                                media_type=MEDIA_TYPES[request.output_format],
                                width=request.delivered_size[0],
                                height=request.delivered_size[1],
                                batch=b,
                                replica=self.replica, node=self.node, gpus=self.gpus,
                                adapters_held=tuple(self.engine.adapters.loaded),
                                gc_ms=(gc_pauses.paused_s() - collected) * 1000, nsfw=nsfw,
                                notes=queued.prepared.result()[0].notes)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[tuple]:
        """Like `generate`, as a stream: ("progress", step, total) while its pipeline call
        runs, ("partial", [encoded image, ...]) for each of its partial images, then
        ("result", GenerationResult or Refused). The first step is always reported, later
        ones at most every `_PROGRESS_EVERY_S` (each streamed item has a cost), and the
        result stands for the last."""
        events: asyncio.Queue = asyncio.Queue()
        work = asyncio.ensure_future(self._generate(
            request, on_step=lambda s, t: events.put_nowait(("progress", s, t)),
            on_preview=lambda images: events.put_nowait(("partial", images))))
        loop, sent_at, event = asyncio.get_running_loop(), None, None
        try:
            while not work.done():
                event = asyncio.ensure_future(events.get())
                await asyncio.wait([work, event], return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                elif event.result()[0] == "partial":  # a flagged one is not sent
                    images, nsfw = await loop.run_in_executor(
                        self._workers, self.outputs.finish, request, event.result()[1], True)
                    if not any(nsfw):
                        yield ("partial", images)
                elif sent_at is None or time.monotonic() - sent_at >= _PROGRESS_EVERY_S:
                    sent_at = time.monotonic()
                    yield event.result()
            yield ("result", _refusal(work.exception()) or work.result())
        finally:
            work.cancel()
            if event is not None:  # a stream dropped while it waited for an event
                event.cancel()

    def _prepare(self, request: GenerationRequest) -> asyncio.Future:
        """Start encoding the request's prompt (or finding it held) and moving its input
        image to the device, on the prompt thread. The request joins the batcher
        meanwhile, so batches form as they would without it; its call awaits the result,
        most often made while an earlier call ran."""
        future = asyncio.get_running_loop().run_in_executor(self._prompts, self.engine.prepare,
                                                            request)
        future.add_done_callback(self._count_prompt)
        return future

    def _count_prompt(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:  # failures: at the call
            self.metrics.prompts.inc(1, {"outcome": "held" if future.result()[1] else
                                         "encoded"})

    async def _hold_adapters(self, adapters: AdapterSet) -> None:
        """Make the set resident; count whether it was held already."""
        try:
            held = await self.adapters.hold(adapters)
        except Exception:
            self.metrics.adapters.inc(1, {"outcome": "failed"})
            raise
        self.metrics.adapters.inc(1, {"outcome": "hit" if held else "load"})

    async def _run_batch(self, queued: Sequence[_Queued], withdrawn: Callable[[], set[int]],
                         on_step: StepListener, on_preview: PreviewListener,
                         ) -> list[list[Image]]:
        loop, steps = asyncio.get_running_loop(), [0]
        requests = [q.request for q in queued]

        def counted(step: int, total: int) -> None:
            steps[0] += 1
            on_step(step, total)

        try:
            prepared = [(await q.prepared)[0] for q in queued]
            started = time.monotonic()
            images = await loop.run_in_executor(self._executor, self.engine.generate, requests,
                                                withdrawn, counted, prepared, on_preview)
        except AtelierError:
            raise  # a client-side problem (e.g. an adapter that does not fit), not a fault
        except Exception as exc:
            # A failed batch is retried in halves down to single requests: only a request
            # failing alone says something about the pipeline's health.
            self._failures += len(requests) == 1
            log.exception("pipeline call failed for request(s) %s",
                          ", ".join(r.request_id for r in requests))
            raise InferenceFailed(f"generation failed: {type(exc).__name__}") from exc
        self._failures = 0
        self.metrics.batch_done(sum(len(own) for own in images), steps[0],
                                time.monotonic() - started)
        self._count_rewrites()
        self._report_memory()
        return images

    def _count_rewrites(self) -> None:
        """Add the weight rewrites of merged adapters since the last count (calls and
        keep-warm calls alike) to their counter."""
        rewrites = self.engine.adapters.rewrites
        if rewrites > self._rewrites:  # Ray's counters refuse 0
            self.metrics.adapter_rewrites.inc(rewrites - self._rewrites)
            self._rewrites = rewrites

    def _report_memory(self) -> None:
        device, used = self.engine.memory()
        self.metrics.memory.set(used, {"device": device})

    def _refresh_gauges(self) -> None:
        """Ray drops a gauge value that is not set again within two export intervals, so
        the slow-moving ones are set again at every health check."""
        self.metrics.load.set(self.load_s)
        self.metrics.warmup.set(self.warmup_s)
        self.metrics.queue_depth.set(self.batcher.queued)
        self._report_memory()

    async def check_health(self) -> None:
        """Raise if a call is stuck, calls keep failing, or the pipeline is unusable.
        Before saying so, answer the requests it holds with ReplicaLost (their callers
        retry elsewhere), so that Serve's graceful stop does not wait for a wedged call.

        The weights' check reads them on the device, so it waits for the work queued there
        (a running call's): it runs on a worker thread, last, and this event loop, which
        forms the batches and answers the requests, goes on meanwhile, and a wedged call is
        found without it."""
        self.batcher.start()  # so that an idle replica keeps warm before its first request
        try:
            since = self.batcher.running_since
            if since is not None and time.monotonic() - since > self.cfg.health_stall_s:
                raise RuntimeError(
                    f"a pipeline call has run for over {self.cfg.health_stall_s}s")
            if self._failures >= _MAX_CONSECUTIVE_FAILURES:
                raise RuntimeError(f"{self._failures} pipeline calls failed in a row")
            self._refresh_gauges()
            await asyncio.get_running_loop().run_in_executor(self._workers, self.engine.check)
        except Exception as exc:
            log.error("%s replica unhealthy: %s", self.cfg.id, exc)
            self.batcher.fail_all(ReplicaLost(
                f"the {self.cfg.id} replica holding this request is unhealthy ({exc}) and "
                "is being replaced; retry"))
            raise


class _Queued(NamedTuple):
    """A request in the batcher, with what its call needs (engine.prepare's result: prompt
    embeddings, input image) being made since its arrival."""

    request: GenerationRequest
    prepared: asyncio.Future


def _refusal(exc: BaseException | None) -> Refused | None:
    """The answer for a client error, so that it is not raised through Serve."""
    return Refused(exc) if isinstance(exc, AtelierError) and exc.status < 500 else None
