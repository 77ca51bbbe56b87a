import httpx
import pytest

from tests.integration.conftest import API_KEY


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {API_KEY}", "Bearer",
                                    f"Bearer {API_KEY}x"])
def test_without_the_key_every_api_route_is_401(base_url, header):
    headers = {"Authorization": header} if header else {}
    for method, path in [("POST", "/generate?prompt=x&seed=1"), ("GET", "/v1/models"),
                         ("GET", "/v1/loras"), ("POST", "/v1/images/generations")]:
        r = httpx.request(method, base_url + path, headers=headers, json={"prompt": "x"})
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert API_KEY not in r.text


@pytest.mark.parametrize("scheme", ["Bearer", "Token", "bearer"])
def test_the_key_opens_the_api_in_both_schemes(base_url, scheme):
    r = httpx.get(base_url + "/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"})
    assert r.status_code == 200 and r.json()["object"] == "list"


def test_health_needs_no_key(base_url):
    r = httpx.get(base_url + "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_openai_errors_keep_the_openai_shape_for_401(base_url):
    r = httpx.post(base_url + "/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
