"""A client leaving a streamed answer (serve/disconnects.py): Serve's replica raises the
proxy call's TaskCancelledError from `receive`; the app must see a disconnect, end the
stream (closing its generator) and return without an error."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import RequestCancelledError

from serve.disconnects import Disconnects


def _streaming_app(events: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/images/generations")
    async def stream():
        async def chunks():
            try:
                for i in range(100):
                    events.append(f"sent {i}")
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.05)
            finally:
                events.append("closed")
        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


def _serve(app, error: Exception) -> list[dict]:
    """Calls `app` as Serve's replica does for a client that leaves after 0.12 s: its
    `receive` gives the request, then raises `error` (the proxy dropped the call)."""
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(0.12)
        raise error

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/images/generations",
             "raw_path": b"/v1/images/generations", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5), "server": ("127.0.0.1", 8000)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return sent


@pytest.mark.parametrize("error", [TaskCancelledError(), RequestCancelledError("r1")])
def test_a_cancelled_receive_ends_the_stream_as_a_disconnect(error):
    events: list[str] = []
    sent = _serve(Disconnects(_streaming_app(events)), error)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]]
    # Chunks every 0.05 s until the client left at 0.12 s (about 3 of the 100), then none.
    assert 1 <= len(bodies) <= 10, bodies
    assert bodies[0] == b"data: 0\n\n"
    assert events[-1] == "closed" and events.count("closed") == 1
    assert len([e for e in events if e.startswith("sent")]) == len(bodies)


def test_without_it_the_stream_ends_with_the_proxy_error():
    with pytest.raises(TaskCancelledError):
        _serve(_streaming_app([]), TaskCancelledError())


def test_an_error_that_is_no_cancel_still_raises():
    with pytest.raises(RuntimeError, match="broken"):
        _serve(Disconnects(_streaming_app([])), RuntimeError("broken"))


def test_the_ingress_app_reads_cancels_as_disconnects_first():
    from serve.app import api

    assert api.user_middleware[0].cls is Disconnects  # outermost: every layer sees it
