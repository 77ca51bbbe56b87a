"""Response headers that tell a client how its request was batched and timed."""

from __future__ import annotations

from serve.types import BatchInfo


def timing_headers(batch: BatchInfo) -> dict[str, str]:
    """X-Atelier-* headers plus a standard Server-Timing header."""
    return {
        "X-Atelier-Queue-Ms": f"{batch.queue_ms:.1f}",
        "X-Atelier-Inference-Ms": f"{batch.inference_ms:.1f}",
        "X-Atelier-Batch-Size": str(batch.images),
        "X-Atelier-Batch-Requests": str(batch.requests),
        "X-Atelier-Batch-Id": batch.batch_id,
        "Server-Timing": f"queue;dur={batch.queue_ms:.1f}, inference;dur={batch.inference_ms:.1f}",
    }
