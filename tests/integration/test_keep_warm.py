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


def test_merged_adapters_count_their_weight_rewrites(base_url, metrics_port):
    """The FLUX model merges its adapters into its weights (SDXL's use slots): each call
    for another set than the last rewrites them, and keep-warm calls restore the base."""
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def rewrites() -> dict[str, float]:
        return counts_by_model(httpx.get(metrics_url, timeout=10).text,
                               "ray_atelier_adapter_weight_rewrites_total")

    start = rewrites().get(FLUX, 0)
    for name in ("neon", "ink", "neon"):
        r = httpx.post(f"{base_url}/generate", headers=AUTH, timeout=60,
                       json={"prompt": "a lamp", "seed": 5, "model": FLUX,
                             "loras": [{"name": name}]})
        assert r.status_code == 200, r.text
    deadline, counts = time.monotonic() + 60, {}
    while time.monotonic() < deadline and counts.get(FLUX, 0) < start + 3:
        time.sleep(2)
        counts = rewrites()
    assert counts.get(FLUX, 0) >= start + 3, counts
    assert set(counts) == {FLUX}, counts  # slots never rewrite weights
