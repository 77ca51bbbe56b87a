"""A client leaving (serve/disconnects.py): Serve's replica raises the proxy call's
TaskCancelledError from `receive`; the app must see a disconnect, end a streamed answer
(closing its generator) and return without an error. A client that leaves while its body
is read is not answered, and its request ends without an error."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import RequestCancelledError
from starlette.requests import ClientDisconnect

from serve.disconnects import Disconnects, install_disconnects


def _app(events: list[str], disconnects: bool = True) -> FastAPI:
    """A streamed answer and a route reading its body, with the middleware installed
    as the ingress installs it (inside Starlette's handler of unhandled errors)."""
    app = FastAPI()
    if disconnects:
        install_disconnects(app)

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

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.body()
        events.append(f"read {len(body)}")
        return {"read": len(body)}

    return app


def _serve(app, error: Exception | dict, path: str = "/v1/images/generations",
           first: dict | None = None) -> list[dict]:
    """Calls `app` as Serve's replica does for a client that leaves after 0.12 s: its
    `receive` gives the request's `first` message (the whole body by default), then
    raises `error` (the proxy dropped the call) or gives it (a disconnect message)."""
    sent: list[dict] = []
    messages = [first or {"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(0.12)
        if isinstance(error, dict):
            return error
        raise error

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5), "server": ("127.0.0.1", 8000)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return sent


@pytest.mark.parametrize("error", [TaskCancelledError(), RequestCancelledError("r1")])
def test_a_cancelled_receive_ends_the_stream_as_a_disconnect(error):
    events: list[str] = []
    sent = _serve(_app(events), error)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]]
    # Chunks every 0.05 s until the client left at 0.12 s (about 3 of the 100), then none.
    assert 1 <= len(bodies) <= 10, bodies
    assert bodies[0] == b"data: 0\n\n"
    assert events[-1] == "closed" and events.count("closed") == 1
    assert len([e for e in events if e.startswith("sent")]) == len(bodies)


def test_without_it_the_stream_ends_with_the_proxy_error():
    with pytest.raises(TaskCancelledError):
        _serve(_app([], disconnects=False), TaskCancelledError())


def test_an_error_that_is_no_cancel_still_raises():
    with pytest.raises(RuntimeError, match="broken"):
        _serve(_app([]), RuntimeError("broken"))


def test_the_ingress_app_reads_cancels_as_disconnects_first():
    from serve.app import api

    assert api.user_middleware[0].cls is Disconnects  # outermost: every layer sees it


HALF_BODY = {"type": "http.request", "body": b'{"prompt": "a ca', "more_body": True}


@pytest.mark.parametrize("error", [TaskCancelledError(), {"type": "http.disconnect"}])
def test_a_client_leaving_while_its_body_is_read_is_not_answered(error):
    events: list[str] = []
    sent = _serve(_app(events), error, "/generate", HALF_BODY)
    assert sent == [] and events == []  # no 500 to nobody, and the route went no further


def test_without_it_a_body_left_half_read_raises():
    with pytest.raises(ClientDisconnect):
        _serve(_app([], disconnects=False), {"type": "http.disconnect"}, "/generate", HALF_BODY)


def test_a_whole_body_is_read_and_answered():
    events: list[str] = []
    sent = _serve(_app(events), TaskCancelledError(), "/generate")
    assert events == ["read 2"]
    assert sent[0]["status"] == 200 and sent[1]["body"] == b'{"read":2}'
