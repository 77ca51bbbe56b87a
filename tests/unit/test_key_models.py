"""API keys limited to some models (`api_keys[].models`): the router answers such a key
with those models alone, by id or alias, the first of them by default, and the config
refuses names that are not served."""

import pytest

from serve.auth import ApiKeyConfig, configured_keys
from serve.config import ConfigError, parse_config
from serve.errors import ModelNotFound
from serve.router import ModelRouter

MODELS = [{"id": "acme/first", "embedded": "tiny-sdxl"},
          {"id": "acme/second", "embedded": "tiny-sdxl", "aliases": ["stability-ai/sdxl"]},
          {"id": "acme/flux", "family": "flux", "embedded": "tiny-flux"}]


def _router_and_keys(*limits):
    keys = [{"key": f"k{i}", "name": f"team-{i}", "models": models}
            for i, models in enumerate(limits)]
    config = parse_config({"models": MODELS, "api_keys": keys})
    return ModelRouter(config, None, {}, None), configured_keys(config.api_keys)


def test_a_limited_key_resolves_its_models_alone_by_id_or_alias():
    router, (limited, open_key) = _router_and_keys(["stability-ai/sdxl", "acme/flux"], None)
    assert [m.id for m in router.usable(limited)] == ["acme/second", "acme/flux"]
    assert router.resolve(None, limited).id == "acme/second"  # its first, not the config's
    assert router.resolve("acme/second", limited).id == "acme/second"
    assert router.resolve("stability-ai/sdxl", limited).id == "acme/second"
    with pytest.raises(ModelNotFound) as refused:
        router.resolve("acme/first", limited)
    assert refused.value.status == 404
    assert str(refused.value).endswith("served: acme/second, acme/flux")
    assert [m.id for m in router.usable(open_key)] == ["acme/first", "acme/second", "acme/flux"]
    assert router.resolve(None, open_key).id == router.resolve(None).id == "acme/first"
    with pytest.raises(ModelNotFound):
        router.resolve("acme/unknown", open_key)


def test_a_key_naming_a_model_not_served_is_a_config_error():
    with pytest.raises(ConfigError, match=r"api_keys\.0\.models: 'acme/gone' is not a served"):
        _router_and_keys(["acme/first", "acme/gone"])
    with pytest.raises(ConfigError, match=r"api_keys\.0\.ApiKeyConfig\.models: List should"):
        _router_and_keys([])


def test_keys_without_a_list_and_keys_from_the_environment_use_every_model(monkeypatch):
    monkeypatch.setenv("ATELIER_API_KEYS", "from-env")
    keys = configured_keys([ApiKeyConfig(key="k", models=["acme/first"], priority=5)])
    assert [k.models for k in keys] == [frozenset({"acme/first"}), None]
    assert [k.priority for k in keys] == [5, 0]
    assert keys[0].may_use(("acme/first", "x")) and not keys[0].may_use(("acme/flux",))
    assert keys[1].may_use(("anything",))
