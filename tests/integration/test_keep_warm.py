"""Keep-warm on the running app: the FLUX model of the test app has `keep_warm_s: 3`, so
while nobody asks it for images its replica runs a one-step call every 3 s, counted on
Ray's metrics port; the calls change nothing in what requests get."""

import time

import httpx

from tests.integration.conftest import AUTH, FLUX, decode, pixels


def _keep_warm_calls(metrics_url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("ray_atelier_keep_warm_calls_total{"):
            model = line.split('model="', 1)[1].split('"', 1)[0]
            counts[model] = counts.get(model, 0) + float(line.rsplit(" ", 1)[1])
    return counts


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
        counts = _keep_warm_calls(metrics_url)
    assert counts.get(FLUX, 0) >= 2, counts
    # Only the model configured for it keeps warm.
    assert set(counts) == {FLUX}, counts
    assert (_image(base_url) == before).all()
