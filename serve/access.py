"""Who may ask what, and how often: the API key check and the per-key request rate of
every request, with the ingress's name and the answered-requests metric on each answer
(and on each request that ends unanswered: 499 when its client left, 500 when it failed).

A plain ASGI middleware. A request whose work is cancelled (its client hung up, so Serve
cancels the call to the model) ends in `CancelledError` as Serve expects; Starlette's
BaseHTTPMiddleware would turn it into a RuntimeError("No response returned."), which
Serve then logs as a future's unretrieved exception.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.auth import OPEN_PREFIXES, matching_key
from serve.context import IngressState
from serve.errors import AtelierError, Unauthorized
from serve.http_errors import api_path, error_response
from serve.rate_limits import counted, draw

# The status counted for a request whose client left before its answer began (it gets
# none): nginx's "client closed request".
CLIENT_LEFT = 499


class Access:
    """ASGI middleware; `state()` gives the ingress replica's state (keys, store, metrics)."""

    def __init__(self, app: ASGIApp, state: Callable[[], IngressState]):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, state = time.monotonic(), self.state()
        request = Request(scope)
        path = api_path(request)
        refusal, headers = await self._refusal(request, path, state)

        begun = False

        async def answered(message: Message) -> None:
            nonlocal begun
            if message["type"] == "http.response.start":
                begun = True
                sent = MutableHeaders(scope=message)
                sent.update(headers)
                sent["X-Atelier-Ingress"] = state.replica
                state.metrics.answered(path, message["status"], time.monotonic() - started)
            await send(message)

        try:
            await (refusal or self.app)(scope, receive, answered)
        except BaseException as exc:
            if not begun:  # counted as it ends: its client left, or Starlette answers 500
                left = isinstance(exc, asyncio.CancelledError | ClientDisconnect)
                state.metrics.answered(path, CLIENT_LEFT if left else 500,
                                       time.monotonic() - started)
            raise

    async def _refusal(self, request: Request, path: str,
                       state: IngressState) -> tuple[ASGIApp | None, dict[str, str]]:
        """(the answer refusing the request, or None to serve it; headers to add): 401
        without a valid key where keys are set, 429 when its key's bucket is empty. The
        route reads the key and its name from `request.state`."""
        key = matching_key(request.headers.get("authorization"), state.api_keys)
        if key is None and state.api_keys and not path.startswith(OPEN_PREFIXES):
            return error_response(path, Unauthorized("missing or wrong API key "
                                                     "(Authorization: Bearer <key>)")), {}
        request.state.client = key.name if key else "open"
        request.state.api_key = key
        if key is None or key.requests_per_minute is None or not counted(request.method, path):
            return None, {}
        try:
            drawn = await draw(state.store, key)
        except AtelierError as exc:  # the store of its bucket does not answer
            return error_response(path, exc), {}
        if drawn.allowed:
            return None, drawn.headers()
        state.metrics.rate_limited.inc(1, {"key": key.name})
        return error_response(path, drawn.refusal(key.name)), drawn.headers()


def install_access(app: FastAPI, state: Callable[[], IngressState]) -> None:
    app.add_middleware(Access, state=state)
