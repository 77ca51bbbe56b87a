"""OpenAI's streamed image answers (`stream: true`, with `partial_images` 0-3): server-sent
events `image_generation.partial_image` (or `image_edit.partial_image`) as the image
forms, then `...completed` with the finished one.

A partial image is the model's current estimate of the finished image, decoded at evenly
spaced steps (see deployments.engines.previews). Errors before the stream starts (a full
queue, a bad adapter) are answered as usual; one after it has started is an `error`
event, the shape the official client raises from.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from serve.context import IngressState
from serve.errors import AtelierError, TimedOut
from serve.http_errors import openai_error
from serve.types import GenerationRequest

_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
          "output_tokens": 0, "total_tokens": 0}  # token counts are for GPT image models


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


async def stream_images(state: IngressState, gen: GenerationRequest,
                        kind: str) -> StreamingResponse:
    """The streamed answer for `gen` (one image); `kind` is image_generation or
    image_edit. Waits for the request's first step, so that a refusal is still a plain
    error answer."""
    timeout_s = state.router.resolve(gen.model).request_timeout_s
    deadline = time.monotonic() + timeout_s
    events = state.router.generate_stream(gen)
    first = await _next(events, deadline, timeout_s)
    common = {"size": f"{gen.width}x{gen.height}", "quality": "auto",
              "background": "opaque", "output_format": gen.output_format}

    async def body() -> AsyncIterator[bytes]:
        event, index = first, 0
        try:
            while True:
                if event[0] == "partial":
                    yield _event(f"{kind}.partial_image", {
                        "type": f"{kind}.partial_image", "b64_json": _b64(event[1][0]),
                        "created_at": int(time.time()), "partial_image_index": index,
                        **common})
                    index += 1
                elif event[0] == "result":
                    result = event[1].unflagged()  # flagged: an error event
                    yield _event(f"{kind}.completed", {
                        "type": f"{kind}.completed", "b64_json": _b64(result.images[0]),
                        "created_at": int(time.time()), "usage": _USAGE, **common,
                        "size": f"{result.width}x{result.height}"})  # (a hires pass's, …)
                    return
                event = await _next(events, deadline, timeout_s)
        except AtelierError as exc:
            yield _event("error", openai_error(exc))
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _next(events: AsyncIterator[tuple], deadline: float, timeout_s: float) -> tuple:
    """The stream's next event; TimedOut (the request withdrawn) past the model's
    request_timeout_s from the start."""
    try:
        return await asyncio.wait_for(anext(events), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise TimedOut(f"no result within {timeout_s:g}s (request_timeout_s)") from None
    except StopAsyncIteration:
        raise AtelierError("the model ended the stream without a result") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
