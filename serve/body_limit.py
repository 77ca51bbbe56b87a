"""A request body over the configured size is refused with 413 before it is parsed.

A declared Content-Length over the limit is answered at once, without reading the body;
a body sent without one (chunked) is counted as it arrives and refused when it passes the
limit, whichever route reads it. Either way the error comes in the shape of the API the
path belongs to, naming the field `body`.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import TooLarge
from serve.http_errors import api_path, error_response


class BodyTooLarge(Exception):
    """Raised from `receive` once the body passes the limit; whatever the app makes of
    it, the client gets the 413."""


def _refusal(scope: Scope, limit: int):
    too_large = TooLarge("body", f"is over the {limit}-byte limit of this server")
    return error_response(api_path(Request(scope)), too_large)


class BodyLimit:
    """ASGI middleware; `limit()` gives the current maximum in bytes."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int]):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _refusal(scope, limit)(scope, receive, send)
            return
        seen, state = 0, {"started": False, "over": False, "answered": False}

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit and not state["started"]:
                    state["over"] = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded(message: Message) -> None:
            if not state["over"]:
                state["started"] = True
                await send(message)
            elif not state["answered"]:  # the app's answer to the error is replaced
                state["answered"] = True
                await _refusal(scope, limit)(scope, receive, send)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["answered"]:
            await _refusal(scope, limit)(scope, receive, send)


def install_body_limit(app: FastAPI, limit: Callable[[], int]) -> None:
    app.add_middleware(BodyLimit, limit=limit)
