"""Response headers that tell a client how its request was batched and timed."""

from __future__ import annotations

from serve.types import GenerationResult


def timing_headers(result: GenerationResult) -> dict[str, str]:
    """X-Atelier-* headers plus a standard Server-Timing header."""
    batch = result.batch
    return {
        "X-Atelier-Replica": result.replica,
        "X-Atelier-Node": result.node,
        "X-Atelier-GPU": ",".join(result.gpus),
        "X-Atelier-Adapters-Held": ",".join(result.adapters_held),
        "X-Atelier-Queue-Ms": f"{batch.queue_ms:.1f}",
        "X-Atelier-Inference-Ms": f"{batch.inference_ms:.1f}",
        "X-Atelier-Batch-Size": str(batch.images),
        "X-Atelier-Batch-Requests": str(batch.requests),
        "X-Atelier-Batch-Id": batch.batch_id,
        "X-Atelier-GC-Ms": f"{result.gc_ms:.1f}",
        "Server-Timing": f"queue;dur={batch.queue_ms:.1f}, inference;dur={batch.inference_ms:.1f}"
                         f", gc;dur={result.gc_ms:.1f}",
    }
