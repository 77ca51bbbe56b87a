import pytest

from serve.errors import InvalidField
from serve.webhooks import EVENTS, check_events, check_webhook


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
