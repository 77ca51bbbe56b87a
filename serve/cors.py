"""Browser apps on other origins (a studio front end, a notebook) calling the APIs: for the
origins in `cors_allowed_origins`, preflights are answered before the key check (a
browser sends them without the key) and every answer, refusals too, carries the CORS
headers, exposing all of the answer's headers (Retry-After, the rate-limit and
X-Atelier- headers). No origin is allowed unless listed."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

_METHODS = ("GET", "POST", "DELETE")


class Cors:
    """ASGI middleware; `origins()` gives the configured origins, read at the first
    request (the ingress replica's config is not there before)."""

    def __init__(self, app: ASGIApp, origins: Callable[[], list[str]]):
        self.app, self._origins = app, origins
        self._inner: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._inner is None:
            origins = self._origins()
            # Requested headers are echoed (Authorization is never covered by a "*"); the
            # key travels in a header, so credentials mode (cookies) is not needed.
            self._inner = CORSMiddleware(self.app, allow_origins=origins,
                                         allow_methods=_METHODS, allow_headers=["*"],
                                         expose_headers=["*"]) if origins else self.app
        await self._inner(scope, receive, send)


def install_cors(app: FastAPI, origins: Callable[[], list[str]]) -> None:
    app.add_middleware(Cors, origins=origins)
