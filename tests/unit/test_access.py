"""The ingress's key and rate checks (serve/access.py) on a small app of their own, over
ASGI: what each answer carries, what is counted, and how a cancelled request ends."""

from __future__ import annotations

import asyncio
import hashlib
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI, Request

from serve.access import install_access
from serve.auth import ApiKeyConfig, configured_keys
from serve.disconnects import install_disconnects
from serve.state import MemoryStore


class Recorder:
    """Stands where IngressMetrics stands: keeps what it is told."""

    def __init__(self):
        self.answers: list[tuple[str, int]] = []
        self.refused: list[dict] = []
        self.rate_limited = SimpleNamespace(inc=lambda n, tags: self.refused.append(tags))

    def answered(self, path: str, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.answers.append((path, status))


def _app(keys: list) -> tuple[FastAPI, SimpleNamespace]:
    state = SimpleNamespace(api_keys=configured_keys(keys), replica="ingress-7",
                            metrics=Recorder(), store=MemoryStore(60, 2**20))
    app = FastAPI()

    @app.post("/generate")
    async def generate(request: Request):
        return {"client": request.state.client}

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.post("/v1/predictions")
    async def cancelled_work():
        # As a model call whose response Serve cancels when the client hangs up: the
        # awaited work ends in CancelledError while the route's own task runs on.
        work = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, work.cancel)
        await work

    @app.post("/v1/images/generations")
    async def read_body(request: Request):
        return {"read": len(await request.body())}

    @app.get("/v1/models")
    async def broken():
        raise RuntimeError("broken")

    install_access(app, lambda: state)
    install_disconnects(app)  # outside the key checks, as in the ingress
    return app, state


def _exchange(app: FastAPI, *calls: tuple[str, str, dict]) -> list[httpx.Response]:
    """The answers to (method, path, headers) calls, sent in turn."""

    async def send_all():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return [await c.request(m, path, headers=h) for m, path, h in calls]

    return asyncio.run(send_all())


def test_keys_are_checked_and_every_answer_names_the_ingress_and_is_counted():
    app, state = _app(["sk-ops", ApiKeyConfig(key="sk-a", name="team-a")])
    missing, wrong, health, named, plain = _exchange(
        app, ("POST", "/generate", {}),
        ("POST", "/generate", {"Authorization": "Bearer sk-b"}), ("GET", "/healthz", {}),
        ("POST", "/generate", {"Authorization": "Bearer sk-a"}),
        ("POST", "/generate", {"Authorization": "Token sk-ops"}))
    assert [missing.status_code, wrong.status_code] == [401, 401]
    assert "missing or wrong API key" in missing.json()["detail"]
    assert health.json() == {"ok": True}
    # A key without a name is known by a hash of it, never by the key itself.
    unnamed = "key-" + hashlib.sha256(b"sk-ops").hexdigest()[:8]
    assert named.json() == {"client": "team-a"} and plain.json() == {"client": unnamed}
    assert {r.headers["x-atelier-ingress"] for r in (missing, wrong, health, named, plain)} \
        == {"ingress-7"}
    assert state.metrics.answers == [("/generate", 401), ("/generate", 401),
                                     ("/healthz", 200), ("/generate", 200), ("/generate", 200)]


def test_a_keys_request_rate_refuses_the_request_past_it_with_retry_after():
    app, state = _app([ApiKeyConfig(key="sk-a", name="team-a", requests_per_minute=2)])
    auth = {"Authorization": "Bearer sk-a"}
    # The health check is not a generation: it takes no token.
    *answers, health = _exchange(app, *[("POST", "/generate", auth)] * 3,
                                 ("GET", "/healthz", auth))
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["1", "0", "0"]
    assert {r.headers["x-ratelimit-limit-requests"] for r in answers} == {"2"}
    assert 1 <= int(answers[2].headers["retry-after"]) <= 30  # one token every 30 s
    assert "x-ratelimit-remaining-requests" not in health.headers
    assert state.metrics.refused == [{"key": "team-a"}]
    assert state.metrics.answers[-2:] == [("/generate", 429), ("/healthz", 200)]


def _call(app: FastAPI, method: str, path: str, messages: list[dict],
          sent: list[dict] | None = None) -> list[dict]:
    """What `app` sends (into `sent`) for a request whose `receive` gives `messages`,
    then waits."""
    sent = [] if sent is None else sent

    async def receive():
        return messages.pop(0) if messages else await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [], "server": ("t", 80), "client": ("c", 1)}
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_request_whose_work_is_cancelled_ends_cancelled_and_is_counted_499():
    # Serve expects CancelledError from a request it cancelled; a RuntimeError would be
    # logged as a future's exception that nobody retrieved.
    app, state = _app([])
    sent: list[dict] = []
    with pytest.raises(asyncio.CancelledError):
        _call(app, "POST", "/v1/predictions",
              [{"type": "http.request", "body": b"", "more_body": False}], sent)
    assert sent == [] and state.metrics.answers == [("/v1/predictions", 499)]


def test_a_client_leaving_during_its_body_and_a_failing_route_are_counted():
    app, state = _app([])
    half = {"type": "http.request", "body": b'{"prompt": "a', "more_body": True}
    left = _call(app, "POST", "/v1/images/generations", [half, {"type": "http.disconnect"}])
    failed: list[dict] = []
    with pytest.raises(RuntimeError, match="broken"):  # after Starlette answered
        _call(app, "GET", "/v1/models", [], failed)
    whole = {"type": "http.request", "body": b"{}", "more_body": False}
    read = _call(app, "POST", "/v1/images/generations", [whole])
    assert left == [] and failed[0]["status"] == 500
    assert read[0]["status"] == 200 and read[1]["body"] == b'{"read":2}'
    assert state.metrics.answers == [("/v1/images/generations", 499), ("/v1/models", 500),
                                     ("/v1/images/generations", 200)]
