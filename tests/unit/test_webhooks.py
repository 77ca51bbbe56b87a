import asyncio
import json

import httpx
import pytest

import serve.webhooks
from serve.errors import InvalidField
from serve.urls import outbound_client
from serve.webhooks import (
    EVENTS,
    WebhookSender,
    check_events,
    check_secret,
    check_webhook,
    new_secret,
    signed_headers,
)


@pytest.mark.parametrize("url", ["http://hooks.example.com/x", "https://HOOKS.example.com/y",
                                 "http://127.0.0.1:9000/z"])
def test_listed_hosts_are_allowed(url):
    check_webhook(url, ["hooks.example.com", "127.0.0.1:9000"])


@pytest.mark.parametrize("url", ["http://127.0.0.1:9001/z", "http://evil.example.com/",
                                 "http://hooks.example.com.evil.net/", "gopher://hooks.example.com/",
                                 "http:///nohost", "http://user@169.254.169.254/"])
def test_other_hosts_ports_and_schemes_are_refused(url):
    with pytest.raises(InvalidField) as err:
        check_webhook(url, ["hooks.example.com", "127.0.0.1:9000"])
    assert err.value.field == "webhook"


def test_no_host_is_allowed_by_default():
    with pytest.raises(InvalidField):
        check_webhook("http://127.0.0.1/x", [])


def test_events_default_to_all_and_unknown_ones_are_refused():
    assert check_events(None) == EVENTS
    assert check_events(["completed"]) == ("completed",)
    with pytest.raises(InvalidField):
        check_events(["finished"])


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/hook", "http://[::1/hook",
                                 "ftp://127.0.0.1/hook", "http:///hook"])
def test_malformed_urls_are_a_field_error_not_a_crash(url):
    from serve.urls import check_allowed_url, host_allowed

    assert not host_allowed(url, ["127.0.0.1", "*.1"])
    with pytest.raises(InvalidField, match="must be an http"):
        check_allowed_url(url, ["127.0.0.1"], "webhook", "webhook_allowed_hosts")


def test_signed_webhooks_pass_replicates_own_check_and_a_changed_body_fails():
    from replicate.webhook import InvalidSignatureError, Webhooks, WebhookSigningSecret

    secret = new_secret()
    body = b'{"id": "p1", "status": "succeeded"}'
    headers = signed_headers(secret, "msg_1", body, 1_700_000_000)
    assert Webhooks.validate(headers=headers, body=body.decode(),
                             secret=WebhookSigningSecret(key=secret)) is None
    with pytest.raises(InvalidSignatureError):
        Webhooks.validate(headers=headers, body=body.decode().replace("p1", "p2"),
                          secret=WebhookSigningSecret(key=secret))
    with pytest.raises(InvalidSignatureError):
        Webhooks.validate(headers=headers, body=body.decode(),
                          secret=WebhookSigningSecret(key=new_secret()))


@pytest.mark.parametrize("secret", ["", "whsec_", "whsec_c2hvcnQ=", "sk_" + "A" * 44,
                                    "whsec_" + "A" * 43 + "_", "whsec_not base64!"])
def test_malformed_signing_secrets_are_refused(secret):
    with pytest.raises(ValueError, match="whsec_"):
        check_secret(secret)
    assert check_secret(new_secret()).startswith("whsec_")


class _Receiver:
    """Answers each attempt with the next of `codes` (then 200), recording (event's
    status, webhook-id) per attempt."""

    def __init__(self, *codes):
        self.codes, self.attempts = list(codes), []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.attempts.append((json.loads(request.content)["status"],
                              request.headers["webhook-id"]))
        return httpx.Response(self.codes.pop(0) if self.codes else 200)


async def _delivered(receiver, count):
    for _ in range(200):
        if len(receiver.attempts) >= count and not serve.webhooks._DELIVERING:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(receiver.attempts)


def test_a_failed_event_gives_way_to_a_newer_one_and_completed_is_retried(monkeypatch):
    monkeypatch.setattr(serve.webhooks, "_FIRST_BACKOFF_S", 0.05)
    receiver = _Receiver(500, 500, 503, 503)

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(receiver)) as client:
            sender = WebhookSender("http://hooks/x", EVENTS, client, new_secret())
            sender.send("start", {"id": "p", "status": "starting"})
            await asyncio.sleep(0.01)  # its first attempt failed; its retry waits
            sender.complete({"id": "p", "status": "succeeded"})
            await _delivered(receiver, 5)

    asyncio.run(run())
    statuses = [status for status, _ in receiver.attempts]
    ids = [message_id for _, message_id in receiver.attempts]
    # start's retry fails with completed waiting: it is not tried again
    assert statuses == ["starting"] * 2 + ["succeeded"] * 3
    assert ids[0] == ids[1] != ids[2] == ids[3] == ids[4]


def test_events_queued_behind_a_slow_one_are_merged_into_the_newest(monkeypatch):
    monkeypatch.setattr(serve.webhooks, "_MIN_INTERVAL_S", 0.0)
    release, seen = asyncio.Event(), []

    async def slow(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["logs"])
        if len(seen) == 1:
            await release.wait()
        return httpx.Response(200)

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(slow)) as client:
            sender = WebhookSender("http://hooks/x", EVENTS, client, new_secret())
            sender.send("start", {"logs": "start"})  # returns before it is delivered
            await asyncio.sleep(0.01)
            for n in range(3):
                sender.send("logs", {"logs": f"step {n}"})
            sender.send("output", {"logs": "output"})
            sender.complete({"logs": "done"})
            sender.send("logs", {"logs": "after"})
            assert seen == ["start"]
            release.set()
            for _ in range(100):
                if not serve.webhooks._DELIVERING:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(run())
    assert seen == ["start", "output", "done", "after"]


def _host(arrived: list, release: asyncio.Event | None = None):
    """A loopback HTTP host's handler: notes each request in `arrived`, then answers 204
    (once `release` is set, if given)."""
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        arrived.append(1)
        if release is not None:
            await release.wait()
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        writer.close()

    return handle


def _url(server: asyncio.Server) -> str:
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"


def test_the_outbound_client_reaches_more_held_calls_than_a_pool_cap_would_allow():
    """120 calls (webhooks, image fetches) to a host that holds each one: all of them reach
    it at once (httpx's default pool would keep the last 20 waiting for a connection)."""
    held, release = [], asyncio.Event()

    async def run():
        server = await asyncio.start_server(_host(held, release), "127.0.0.1", 0)
        url = _url(server)
        async with server, outbound_client() as client:
            calls = [asyncio.create_task(client.post(url, content=b"{}", timeout=10))
                     for _ in range(120)]
            for _ in range(150):
                if len(held) == len(calls):
                    break
                await asyncio.sleep(0.02)
            reached = len(held)
            release.set()
            return reached, await asyncio.gather(*calls)

    reached, answers = asyncio.run(run())
    assert reached == 120 and [a.status_code for a in answers] == [204] * 120


def test_a_receiver_that_hangs_holds_its_own_share_of_connections_and_no_more():
    held, answered, release = [], [], asyncio.Event()

    async def run():
        slow = await asyncio.start_server(_host(held, release), "127.0.0.1", 0)
        fine = await asyncio.start_server(_host(answered), "127.0.0.1", 0)
        urls = [_url(slow), _url(fine)]
        async with slow, fine, outbound_client() as client:
            for n in range(40):
                WebhookSender(urls[0], EVENTS, client, new_secret()).send("start", {"n": n})
            await asyncio.sleep(0.2)
            WebhookSender(urls[1], EVENTS, client, new_secret()).send("start", {"n": 40})
            for _ in range(100):
                if answered:
                    break
                await asyncio.sleep(0.02)
            seen = len(held), len(answered)
            release.set()
            for _ in range(200):
                if not serve.webhooks._DELIVERING:
                    break
                await asyncio.sleep(0.02)
            return seen

    assert asyncio.run(run()) == (serve.webhooks.PER_RECEIVER, 1)
    assert len(held) == 40  # once it answers, the others are delivered
