"""Keep-warm on the running app: the FLUX model of the test app has `keep_warm_s: 3`, so
while nobody asks it for images its replica runs a one-step call every 3 s, counted on
Ray's metrics port; the calls change nothing in what requests get."""

import time

import httpx

from tests.conftest import counts_by_model
from tests.integration.conftest import AUTH, FLUX, decode, pixels


def _image(base_url):
    r = httpx.post(f"{base_url}/generate", headers=AUTH, timeout=60,
                   json={"prompt": "a lamp", "seed": 5, "model": FLUX})
    assert r.status_code == 200, r.text
    return pixels(decode(r.json()["images"][0]))


def test_an_idle_replica_keeps_warm_and_its_answers_do_not_change(base_url, metrics_port):
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    before = _image(base_url)
    deadline, counts = time.monotonic() + 90, {}
    while time.monotonic() < deadline and counts.get(FLUX, 0) < 2:
        time.sleep(2)
        counts = counts_by_model(httpx.get(metrics_url, timeout=10).text,
                                 "ray_atelier_keep_warm_calls_total")
    assert counts.get(FLUX, 0) >= 2, counts
    # Only the model configured for it keeps warm.
    assert set(counts) == {FLUX}, counts
    assert (_image(base_url) == before).all()
