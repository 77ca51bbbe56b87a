"""Prediction webhooks to a real HTTP receiver on loopback."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.integration.conftest import (
    AUTH,
    BATCHED,
    FAST,
    OPS_KEY,
    URGENT_KEY,
    URGENT_SECRET,
)


class Receiver:
    """Records POSTed JSON bodies (and every attempt's headers and bytes); answers 500 to
    the first `fail_first` of them. With `hold` (a threading.Event), the first attempt is
    answered only once it is set."""

    def __init__(self, fail_first=0, hold=None):
        self.bodies, self.attempts, self.fail_first = [], 0, fail_first
        self.hold = hold
        self.raw = []  # (headers, body bytes) of every attempt
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["content-length"]))
                receiver.raw.append((dict(self.headers), raw))
                body = json.loads(raw)
                receiver.attempts += 1
                if receiver.hold is not None and receiver.attempts == 1:
                    receiver.hold.wait(60)
                ok = receiver.attempts > receiver.fail_first
                if ok:
                    receiver.bodies.append(body)
                self.send_response(200 if ok else 500)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, status, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(b["status"] == status for b in self.bodies):
                return
            time.sleep(0.05)
        raise AssertionError(f"no webhook with status {status}: {self.bodies}")


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def _create(base_url, model=FAST, headers=AUTH, **body):
    r = httpx.post(f"{base_url}/v1/models/{model}/predictions", headers=headers,
                   json={"input": {"prompt": "x", "seed": 3}, **body}, timeout=60)
    return r


def test_start_and_completed_reach_the_receiver_with_the_output(base_url, receiver):
    created = _create(base_url, webhook=receiver.url).json()
    receiver.wait_for("succeeded")
    events = [(b["id"], b["status"]) for b in receiver.bodies]
    assert events[0] == (created["id"], "starting")
    assert events[-1] == (created["id"], "succeeded")
    assert receiver.bodies[-1]["output"][0].startswith(base_url + "/files/")


def test_a_receiver_that_has_not_answered_does_not_hold_the_prediction_back(base_url):
    hold = threading.Event()
    receiver = Receiver(hold=hold)
    try:
        r = _create(base_url, webhook=receiver.url, headers={**AUTH, "Prefer": "wait=30"})
        done = r.json()
        assert r.status_code == 201 and done["status"] == "succeeded"
        assert receiver.attempts == 1 and receiver.bodies == []  # start: still unanswered
        hold.set()
        receiver.wait_for("succeeded")
    finally:
        hold.set()
        receiver.server.shutdown()
    # in order; what came while start was held (if anything) went out as one event
    statuses = [b["status"] for b in receiver.bodies]
    assert statuses[0] == "starting" and statuses[-1] == "succeeded" and len(statuses) <= 3
    assert [b["id"] for b in receiver.bodies] == [done["id"]] * len(statuses)
    stored = httpx.get(f"{base_url}/v1/predictions/{done['id']}", headers=AUTH).json()
    assert receiver.bodies[-1]["output"] == stored["output"]
    assert stored["output"][0].startswith(base_url + "/files/")


def test_the_events_filter_is_honoured(base_url, receiver):
    _create(base_url, webhook=receiver.url, webhook_events_filter=["completed"])
    receiver.wait_for("succeeded")
    time.sleep(0.3)
    assert [b["status"] for b in receiver.bodies] == ["succeeded"]


def test_a_failing_receiver_is_retried_until_it_answers(base_url):
    receiver = Receiver(fail_first=1)
    try:
        r = _create(base_url, webhook=receiver.url, webhook_events_filter=["completed"])
        assert r.status_code == 201
        receiver.wait_for("succeeded")
        assert receiver.attempts == 2
    finally:
        receiver.server.shutdown()


def test_a_canceled_prediction_sends_completed_as_canceled(base_url, receiver):
    created = _create(base_url, model=BATCHED, webhook=receiver.url).json()
    httpx.post(f"{base_url}/v1/predictions/{created['id']}/cancel", headers=AUTH)
    receiver.wait_for("canceled")
    assert receiver.bodies[-1]["output"] is None


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data",
                                 "http://localhost:8000/hook", "file:///etc/passwd",
                                 "http://10.0.0.1/x", "ftp://127.0.0.1/x"])
def test_webhooks_to_hosts_not_allowed_are_refused_before_anything_runs(base_url, url):
    r = _create(base_url, webhook=url)
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "webhook"


def test_an_unknown_event_is_refused(base_url, receiver):
    r = _create(base_url, webhook=receiver.url, webhook_events_filter=["done"])
    assert r.status_code == 422
    assert r.json()["invalid_fields"][0]["field"] == "webhook_events_filter"


def test_webhooks_are_signed_as_replicate_signs_them(base_url, rep):
    from replicate.webhook import InvalidSignatureError

    receiver = Receiver(fail_first=1)
    try:
        _create(base_url, webhook=receiver.url, webhook_events_filter=["start", "completed"])
        receiver.wait_for("succeeded")
    finally:
        receiver.server.shutdown()
    secret = rep.webhooks.default.secret()
    assert secret.key.startswith("whsec_") and rep.webhooks.default.secret() == secret
    for headers, raw in receiver.raw:
        assert rep.webhooks.validate(headers=headers, body=raw.decode(), secret=secret,
                                     tolerance=60) is None
    ids = [headers["webhook-id"] for headers, _ in receiver.raw]
    assert len(receiver.raw) == 3 and ids[0] == ids[1] != ids[2]  # a retry keeps its id
    headers, raw = receiver.raw[-1]
    with pytest.raises(InvalidSignatureError):
        rep.webhooks.validate(headers=headers, body=raw.decode().replace("succeeded", "failed"),
                              secret=secret)


def test_each_key_signs_its_own_webhooks_with_a_secret_of_its_own(base_url, rep, receiver):
    import replicate
    from replicate.webhook import InvalidSignatureError

    ops, team_d = (replicate.Client(api_token=k, base_url=base_url) for k in (OPS_KEY, URGENT_KEY))
    secrets = [c.webhooks.default.secret() for c in (rep, ops, team_d)]
    assert len({s.key for s in secrets}) == 3 and secrets[2].key == URGENT_SECRET
    assert [c.accounts.current().username for c in (ops, team_d)] == ["ops", "team-d"]
    _create(base_url, headers={"Authorization": f"Bearer {OPS_KEY}"}, webhook=receiver.url,
            webhook_events_filter=["completed"])
    receiver.wait_for("succeeded")
    (headers, raw), = receiver.raw
    assert ops.webhooks.validate(headers=headers, body=raw.decode(), secret=secrets[1],
                                 tolerance=60) is None
    for other in (secrets[0], secrets[2]):  # no other key's receiver would take it
        with pytest.raises(InvalidSignatureError):
            ops.webhooks.validate(headers=headers, body=raw.decode(), secret=other)
