"""A client that leaves while it is answered is a disconnect, not an error.

Serve's replica reads a request's messages from its proxy; once the proxy drops the
request (its client went away), that read raises the proxy call's `TaskCancelledError`
in whatever awaits `receive`. A streamed answer (Starlette listens for the disconnect
while it streams) then ended with that error, which the replica logged with its
traceback ("Task exception was never retrieved") for many of the streams a client left.
The app sees ASGI's `http.disconnect` message instead, and the stream ends as it would
for any disconnect. A client that leaves while its body is read (Starlette's
`ClientDisconnect`) is not answered: there is nobody to answer, and its request ends
without the 500 and the traceback ("Future exception was never retrieved") an unhandled
exception gets.
"""

from __future__ import annotations

from fastapi import FastAPI
from ray.exceptions import TaskCancelledError
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DISCONNECT: Message = {"type": "http.disconnect"}


class Disconnects:
    """ASGI middleware: a `receive` the proxy cancelled gives `http.disconnect`; a
    request whose client left before its body was read ends unanswered."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def received() -> Message:
            try:
                return await receive()
            except TaskCancelledError:  # (Serve's RequestCancelledError among them)
                return DISCONNECT

        try:
            await self.app(scope, received, send)
        except ClientDisconnect:  # raised only once `receive` gave http.disconnect
            pass


def install_disconnects(app: FastAPI) -> None:
    app.add_middleware(Disconnects)
