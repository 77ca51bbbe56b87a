"""LoRA files given by URL (Replicate's `lora_weights`), downloaded by the replicas from a
real local HTTP server on a host in the app's lora_allowed_hosts (127.0.0.1)."""

import io
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import AUTH, FAST, FLUX, decode, pixels, replica_log, same_pixels


def _gen(client, model, loras, seed=11, prompt="a cat"):
    r = client.post("/generate", json={"prompt": prompt, "seed": seed, "model": model,
                                       "loras": loras})
    assert r.status_code == 200, r.text
    return r


def test_an_adapter_by_url_gives_the_catalog_adapters_pixels_and_downloads_once(
        client, lora_server):
    lora = f"{lora_server.url}/watercolor.safetensors?first"
    by_url = _gen(client, FAST, [{"name": lora, "scale": 0.7}])
    by_name = _gen(client, FAST, [{"name": "watercolor", "scale": 0.7}])
    base = _gen(client, FAST, [])
    assert same_pixels(by_url.json()["image"], by_name.json()["image"])
    assert np.abs(pixels(decode(by_url.json()["image"]))
                  - pixels(decode(base.json()["image"]))).mean() > 1
    held = by_url.headers["x-atelier-adapters-held"].split(",")
    assert any(h.startswith("url-") for h in held)
    again = [_gen(client, FAST, [{"name": lora}], seed=s) for s in (1, 2)]
    assert len({r.json()["image"] for r in again}) == 2
    assert lora_server.paths.count("/watercolor.safetensors?first") == 1


def test_replicate_flux_lora_weights_url_with_the_official_client(rep, client, lora_server):
    url = lora_server.url
    (png,) = rep.run(FLUX, input={"prompt": "a lamp", "seed": 5, "output_format": "png",
                                  "lora_weights": f"{url}/neon.safetensors",
                                  "lora_scale": 0.8, "extra_lora": "ink",
                                  "extra_lora_scale": 0.5})
    named = _gen(client, FLUX, [{"name": "neon", "scale": 0.8}, {"name": "ink", "scale": 0.5}],
                 seed=5, prompt="a lamp")
    assert np.array_equal(pixels(Image.open(io.BytesIO(png.read()))),
                          pixels(decode(named.json()["image"])))


@pytest.mark.parametrize("ref, model, reason", [
    ("https://example.com/a.safetensors", FAST,
     "host example.com is not in this server's lora_allowed_hosts"),
    ("huggingface.co/acme/style", FAST, "host huggingface.co is not in this server's"),
    ("huggingface.co/acme/style/tree/main", FAST, "give a Hugging Face repository"),
    ("{url}/gone.safetensors", FAST, "gave HTTP 404"),
    ("{url}/neon.safetensors", FAST, "neon.safetensors has no unet LoRA weights"),
    ("{url}/pixel-art.safetensors", FLUX, "pixel-art.safetensors has no transformer LoRA"),
])
def test_bad_adapter_urls_get_a_clear_422_and_the_replica_keeps_serving(
        client, lora_server, ref, model, reason):
    url = lora_server.url
    r = client.post("/generate", json={"prompt": "x", "model": model,
                                       "loras": [{"name": ref.format(url=url)}]})
    assert r.status_code == 422 and reason in r.text, r.text
    assert _gen(client, model, [], prompt="x").json()["seeds"] == [11]


def test_a_refused_adapter_is_answered_by_the_replica_not_raised_through_serve(
        client, lora_server):
    """Serve logs each exception a replica raises as a failed request (its call's line
    says ERROR, a traceback follows) and counts it in its error counter; its multiplexing
    logs an ERROR line for a set it fails to load. A client's bad adapter URL is none of
    that: the call's only line says OK."""
    rid = f"refused-adapter-{uuid.uuid4().hex}"
    r = client.post("/generate", headers={"X-Request-Id": rid}, json={
        "prompt": "x", "model": FAST, "loras": [{"name": f"{lora_server.url}/gone.safetensors"}]})
    assert r.status_code == 422 and "gave HTTP 404" in r.text, r.text
    lines = replica_log("model-atelier-tiny-sdxl", rid)
    calls = [line.split(" -- ")[1].rsplit(" ", 1)[0] for line in lines if " -- CALL " in line]
    assert calls == ["CALL generate OK"], lines
    assert not [line for line in lines if line.startswith("ERROR")], lines


def test_a_prediction_whose_lora_cannot_be_downloaded_fails_with_the_reason(rep, lora_server):
    from replicate.exceptions import ModelError

    with pytest.raises(ModelError) as failed:
        rep.run(FAST, input={"prompt": "a cat", "seed": 3,
                             "lora_weights": f"{lora_server.url}/gone.safetensors"})
    prediction = failed.value.prediction
    assert prediction.status == "failed" and "gave HTTP 404" in prediction.error, prediction
    assert rep.run(FAST, input={"prompt": "a cat", "seed": 3})  # the replica keeps serving


class _HangingHost:
    """Takes each GET and answers it (404) only once `release` is set."""

    def __init__(self, release: threading.Event):
        self.arrived = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                host.arrived.append(self.path)
                release.wait(60)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.arrived) < count:
            assert time.monotonic() < deadline, self.arrived
            time.sleep(0.05)


def test_downloads_from_a_host_that_hangs_do_not_hold_up_other_requests(client, base_url):
    """The replica's workers finish every request's images (encoding, the safety check):
    LoRA downloads, however long their host takes, run beside them."""
    release = threading.Event()
    host = _HangingHost(release)
    try:
        with ThreadPoolExecutor(8) as pool:
            hanging = [pool.submit(httpx.post, f"{base_url}/generate", headers=AUTH, timeout=90,
                                   json={"prompt": "x", "model": FAST, "loras": [
                                       {"name": f"{host.url}/slow-{n}.safetensors"}]})
                       for n in range(8)]
            host.wait_for(2)
            plain = client.post("/generate", json={"prompt": "x", "model": FAST, "seed": 4},
                                timeout=20)
            assert plain.status_code == 200 and plain.json()["seeds"] == [4]
            assert not any(f.done() for f in hanging)  # their downloads still wait
            release.set()
            answers = [f.result() for f in hanging]
    finally:
        release.set()
        host.server.shutdown()
    assert [a.status_code for a in answers] == [422] * 8
    assert all("gave HTTP 404" in a.text for a in answers)
