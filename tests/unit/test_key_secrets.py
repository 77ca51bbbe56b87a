"""Each API key's webhook signing secret (serve.webhooks.key_secret, `api_keys[]
.webhook_secret`): derived from the server's secret and the key's name unless the key sets
one, so that no key can sign webhooks that another key's receiver would take."""

import pytest
from replicate.webhook import InvalidSignatureError, Webhooks, WebhookSigningSecret

from serve.auth import ApiKeyConfig
from serve.config import ConfigError, default_config, parse_config
from serve.webhooks import check_secret, key_secret, new_secret, signed_headers

SECRET = "whsec_" + "QUJD" * 8  # base64 of 24 bytes


def test_a_keys_secret_is_derived_from_the_master_and_its_name():
    master = new_secret()
    team_a = key_secret(master, "team-a")
    assert check_secret(team_a) == team_a  # a Standard Webhooks secret, as clients expect
    assert key_secret(master, "team-a") == team_a  # the same on every ingress, every start
    assert len({master, team_a, key_secret(master, "team-b"), key_secret(master, "team-a2"),
                key_secret(new_secret(), "team-a")}) == 5
    body = b'{"id": "p1", "status": "succeeded"}'
    headers = signed_headers(team_a, "msg_1", body, 1_700_000_000)
    assert Webhooks.validate(headers=headers, body=body.decode(),
                             secret=WebhookSigningSecret(key=team_a)) is None
    for other in (master, key_secret(master, "team-b")):
        with pytest.raises(InvalidSignatureError):
            Webhooks.validate(headers=headers, body=body.decode(),
                              secret=WebhookSigningSecret(key=other))


def _keys(*keys):
    base = default_config().model_dump(mode="json")
    return parse_config({**base, "api_keys": list(keys)})


def test_a_key_may_set_its_own_secret_and_keys_sharing_a_name_must_agree():
    config = _keys({"key": "k1", "name": "team-a", "webhook_secret": SECRET},
                   {"key": "k2", "name": "team-a"},
                   {"key": "k3", "name": "team-a", "webhook_secret": SECRET})
    assert [k.webhook_secret for k in config.api_keys] == [SECRET, None, SECRET]
    with pytest.raises(ConfigError, match=r"api_keys.0.ApiKeyConfig.webhook_secret: .*whs"):
        _keys({"key": "k1", "name": "team-a", "webhook_secret": "hunter2"})
    with pytest.raises(ConfigError, match="keys named 'team-a' set different webhook_secret"):
        _keys({"key": "k1", "name": "team-a", "webhook_secret": SECRET},
              {"key": "k2", "name": "team-a", "webhook_secret": new_secret()})


def test_no_key_may_take_the_name_of_requests_made_without_one():
    # A server without keys calls every request "open", and "open" sees every prediction.
    with pytest.raises(ConfigError, match="api_keys.0.ApiKeyConfig.name: .*'open'"):
        _keys({"key": "k1", "name": "open"})
    assert ApiKeyConfig(key="k1", name="opener").name == "opener"
