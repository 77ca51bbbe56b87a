"""Browser apps on the configured origin (STUDIO) calling the APIs across origins, as a
browser does: a preflight without the key, then the request with it; answers to other
origins allow none, so browsers keep the answers from them."""

import httpx

from tests.integration.conftest import AUTH, MAX_BODY_BYTES, STUDIO

# What openai-node sends from a browser (dangerouslyAllowBrowser) beside its key.
_ASKED = "authorization,content-type,x-stainless-lang,x-stainless-retry-count"


def _preflight(base_url, path, origin):
    return httpx.options(base_url + path, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": _ASKED})


def test_a_preflight_from_the_studio_is_allowed_without_the_key(base_url):
    for path in ("/v1/images/generations", "/v1/predictions", "/generate"):
        r = _preflight(base_url, path, STUDIO)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["access-control-allow-origin"] == STUDIO
        assert set(r.headers["access-control-allow-methods"].split(", ")) >= {"GET", "POST",
                                                                              "DELETE"}
        assert r.headers["access-control-allow-headers"] == _ASKED  # Authorization named
        assert "access-control-allow-credentials" not in r.headers


def test_a_preflight_from_another_origin_is_refused(base_url):
    for origin in ("http://elsewhere.test", "http://studio.test:5174", "null"):
        r = _preflight(base_url, "/v1/images/generations", origin)
        assert r.status_code == 400 and r.text == "Disallowed CORS origin", origin
        assert "access-control-allow-origin" not in r.headers


def test_answers_to_the_studio_carry_the_headers_and_expose_all_of_theirs(base_url):
    origin = {"Origin": STUDIO}
    r = httpx.post(f"{base_url}/generate", json={"prompt": "a cat", "seed": 3},
                   headers={**AUTH, **origin, "Accept": "image/png"}, timeout=60)
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    assert r.headers["access-control-allow-origin"] == STUDIO
    assert r.headers["access-control-expose-headers"] == "*"
    assert r.headers["x-atelier-seed"] == "3" and "origin" in r.headers["vary"].lower()
    refusals = [httpx.get(f"{base_url}/v1/models", headers=origin),  # no key: 401
                httpx.post(f"{base_url}/generate", headers={**AUTH, **origin},
                           content=b"x" * (MAX_BODY_BYTES + 1))]  # 413 before it is read
    assert [r.status_code for r in refusals] == [401, 413]
    assert all(r.headers["access-control-allow-origin"] == STUDIO for r in refusals)


def test_answers_to_other_origins_allow_no_origin(base_url):
    r = httpx.get(f"{base_url}/v1/models", headers={**AUTH, "Origin": "http://elsewhere.test"})
    assert r.status_code == 200 and r.json()["object"] == "list"
    assert not [h for h in r.headers if h.startswith("access-control-allow-")]
