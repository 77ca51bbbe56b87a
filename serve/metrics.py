"""Every Atelier metric, defined here and nowhere else.

Metrics are `ray.serve.metrics` objects: Ray's per-node agent exports them (names gain a
`ray_` prefix, counters a `_total` suffix) on the node's metrics port, and Serve adds the
`application`, `deployment` and `replica` labels. Labels are bounded: model id, API name,
status code, error kind, adapter outcome, API key name (the operator's, never the key);
never prompts or adapter names.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
BATCH_IMAGES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
FILL = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
GC_SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]

# HTTP statuses counted as errors of a kind at the ingress; failures past validation
# (overload, timeout, out of memory, canceled, failed) are counted where they happen.
_KIND_BY_STATUS = {400: "validation", 401: "unauthorized", 404: "not_found",
                   413: "too_large", 422: "validation", 429: "rate_limited"}
_API_BY_PREFIX = (("/v1/images", "openai"), ("/v1/predictions", "replicate"),
                  ("/v1/models/", "replicate"), ("/v1/models", "models"),
                  ("/v1/files", "replicate"), ("/v1/deployments", "replicate"),
                  ("/v1/account", "replicate"), ("/v1/webhooks", "replicate"),
                  ("/generate", "generate"), ("/files", "files"), ("/v1/loras", "loras"),
                  ("/healthz", "health"))


def api_name(path: str) -> str:
    """The public API a path belongs to (a bounded label)."""
    for prefix, name in _API_BY_PREFIX:
        if path.startswith(prefix):
            return name
    return "other"


def error_kind(status: int) -> str | None:
    """The error kind the ingress counts for an HTTP status, or None."""
    return _KIND_BY_STATUS.get(status)


def gc_pause_histogram() -> Histogram:
    """Garbage collections of a replica's process (ingress or model), timed by
    `serve.gc_pauses.watch`: every thread of the replica waits while one runs."""
    return Histogram("atelier_gc_pause_seconds", "Time one garbage collection held a "
                     "replica's interpreter, by generation (2: a full collection)",
                     boundaries=GC_SECONDS, tag_keys=("generation",))


class IngressMetrics:
    """Recorded by the ingress replicas: what clients asked and got."""

    def __init__(self):
        self.requests = Counter("atelier_requests", (
            "HTTP requests answered, by status; 499: the client left before its answer began"),
                                tag_keys=("api", "status"))
        self.duration = Histogram("atelier_request_duration_seconds",
                                  "HTTP request time at the ingress, end to end",
                                  boundaries=SECONDS, tag_keys=("api",))
        self.errors = Counter("atelier_errors", "Failed requests by kind",
                              tag_keys=("model", "kind"))
        self.images = Counter("atelier_images", "Images delivered to clients",
                              tag_keys=("model",))
        self.controlnet_images = Counter("atelier_controlnet_images", (
            "Images delivered that a ControlNet steered, by ControlNet"),
            tag_keys=("model", "controlnet"))
        self.image_prompt_images = Counter("atelier_image_prompt_images", (
            "Images delivered that an image prompt (IP-Adapter or FLUX.1 Redux) steered"),
            tag_keys=("model",))
        self.upscaled_images = Counter("atelier_upscaled_images", (
            "Images delivered enlarged (`upscale`, real-esrgan's scale), by upscaler"),
            tag_keys=("model", "upscaler"))
        self.edited_images = Counter("atelier_edited_images", (
            "Images delivered that edited a reference image (FLUX.1 Kontext)"),
            tag_keys=("model",))
        self.generation = Histogram("atelier_generation_duration_seconds",
                                    "Time from routing a request to its images",
                                    boundaries=SECONDS, tag_keys=("model",))
        self.key_images = Counter("atelier_key_images", "Images delivered, by API key name",
                                  tag_keys=("key", "model"))
        self.key_seconds = Counter("atelier_key_pipeline_seconds", (
            "Pipeline time used, by API key name: each call's time shared by its images"),
            tag_keys=("key", "model"))
        self.rate_limited = Counter("atelier_rate_limited", "Requests refused with 429 "
                                    "by their API key's rate", tag_keys=("key",))
        self.ingress_waiting = Gauge("atelier_ingress_waiting_requests", (
            "Requests waiting at the ingress, by priority, for a place on a model's "
            "replicas"), tag_keys=("model",))
        self.replicas_running = Gauge("atelier_model_replicas_running", (
            "A model's replicas that take requests, as the ingress reads them from Serve"),
            tag_keys=("model",))
        self.replicas_wanted = Gauge("atelier_model_replicas_wanted", (
            "The replicas a model should run at least: its `replicas`, or autoscaled its "
            "`min_replicas`"), tag_keys=("model",))
        self.unfinished = Gauge("atelier_unfinished_predictions", (
            "Replicate predictions this ingress replica runs, from acceptance (or adoption) "
            "to their end, and creates it is still making: max_unfinished_predictions "
            "bounds them"))
        self.store_available = Gauge("atelier_store_available", (
            "1 while the prediction and file store (Redis, or the replica's memory) "
            "answers this ingress replica, else 0"))

    def answered(self, path: str, status: int, seconds: float) -> None:
        api = api_name(path)
        self.requests.inc(1, {"api": api, "status": str(status)})
        self.duration.observe(seconds, {"api": api})
        kind = error_kind(status)
        if kind is not None:
            self.errors.inc(1, {"model": "unknown", "kind": kind})

    def used(self, client: str, model: str, images: int, share_s: float) -> None:
        tags = {"key": client or "open", "model": model}
        if images > 0:  # Ray's counters refuse 0
            self.key_images.inc(images, tags)
        if share_s > 0:  # Ray's counters refuse 0
            self.key_seconds.inc(share_s, tags)

    def failed(self, model: str, kind: str) -> None:
        self.errors.inc(1, {"model": model, "kind": kind})

    def waiting(self, model: str, count: int) -> None:
        self.ingress_waiting.set(count, {"model": model})

    def replicas(self, model: str, running: int, wanted: int) -> None:
        self.replicas_running.set(running, {"model": model})
        self.replicas_wanted.set(wanted, {"model": model})

    def unfinished_predictions(self, count: int) -> None:
        self.unfinished.set(count)

    def store(self, available: bool) -> None:
        self.store_available.set(1 if available else 0)


class ModelMetrics:
    """Recorded by a model replica (Serve adds its `replica` label)."""

    def __init__(self, model: str, max_batch_images: int):
        self.max_batch_images = max_batch_images

        def made(metric):
            metric.set_default_tags({"model": model})  # Serve adds its tags to the dict
            return metric

        self.queue_wait = made(Histogram("atelier_queue_wait_seconds", "Wait for a batch",
                                         boundaries=SECONDS, tag_keys=("model",)))
        self.inference = made(Histogram("atelier_inference_seconds", "One pipeline call",
                                        boundaries=SECONDS, tag_keys=("model",)))
        self.batch_images = made(Histogram("atelier_batch_images", "Images per pipeline call",
                                           boundaries=BATCH_IMAGES, tag_keys=("model",)))
        self.batch_fill = made(Histogram("atelier_batch_fill_ratio",
                                         "Images per call over the batch size limit",
                                         boundaries=FILL, tag_keys=("model",)))
        self.generated = made(Counter("atelier_generated_images", "Images computed",
                                      tag_keys=("model",)))
        self.steps = made(Counter("atelier_denoising_steps", "Denoising steps run",
                                  tag_keys=("model",)))
        self.queue_depth = made(Gauge("atelier_queue_depth_requests",
                                      "Requests waiting for a batch", tag_keys=("model",)))
        self.adapters = made(Counter("atelier_adapter_requests",
                                     "Adapter sets asked of the replica, by outcome",
                                     tag_keys=("model", "outcome")))
        self.adapter_rewrites = made(Counter(
            "atelier_adapter_weight_rewrites",
            "Times a replica with merged adapters (fuse_adapters) restored its weights and "
            "merged another adapter set", tag_keys=("model",)))
        self.prompts = made(Counter("atelier_prompt_encodings",
                                    "Prompts a replica needed, by outcome (encoded, or "
                                    "held from a recent request)",
                                    tag_keys=("model", "outcome")))
        self.safety_flagged = made(Counter(
            "atelier_safety_flagged_images",
            "Images (and partial images) the safety checker flagged and withheld",
            tag_keys=("model",)))
        self.keep_warm = made(Counter("atelier_keep_warm_calls",
                                      "One-step calls an idle replica ran to stay warm",
                                      tag_keys=("model",)))
        self.load = made(Gauge("atelier_model_load_seconds", "Pipeline load time",
                               tag_keys=("model",)))
        self.warmup = made(Gauge("atelier_model_warmup_seconds", "Warm-up call time",
                                 tag_keys=("model",)))
        self.memory = made(Gauge("atelier_device_memory_bytes",
                                 "Memory the replica holds on its device (GPU memory "
                                 "allocated by torch; resident memory on CPU)",
                                 tag_keys=("model", "device")))

    def batch_done(self, images: int, steps: int, seconds: float) -> None:
        # Ray's counters refuse 0: a call whose requests all left, or an img2img call at
        # strength 0 (no denoising step), adds nothing to them.
        if images:
            self.generated.inc(images)
        if steps:
            self.steps.inc(steps)
        self.inference.observe(seconds)
        self.batch_images.observe(images)
        self.batch_fill.observe(min(1.0, images / self.max_batch_images))
