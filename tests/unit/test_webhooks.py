import pytest

from serve.errors import InvalidField
from serve.webhooks import (
    EVENTS,
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
