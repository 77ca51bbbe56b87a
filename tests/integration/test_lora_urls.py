"""LoRA files given by URL (Replicate's `lora_weights`), downloaded by the replicas from a
real local HTTP server on a host in the app's lora_allowed_hosts (127.0.0.1)."""

import io
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import FAST, FLUX, decode, pixels


@pytest.fixture(scope="module")
def lora_server(cache_dir):
    """Serves the demo adapters' files as /<name>.safetensors; counts GETs per path."""
    from deployments.tiny import TINY_FLUX_DEMO, TINY_SDXL_DEMO, ensure_demo_loras

    files = {f"/{p.name}": p.read_bytes()
             for demo in (TINY_SDXL_DEMO, TINY_FLUX_DEMO)
             for p in ensure_demo_loras(demo, cache_dir).glob("*.safetensors")}
    gets = Counter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            gets[self.path] += 1
            body = files.get(self.path.split("?")[0])
            self.send_response(404 if body is None else 200)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", gets
    httpd.shutdown()


def _gen(client, model, loras, seed=11, prompt="a cat"):
    r = client.post("/generate", json={"prompt": prompt, "seed": seed, "model": model,
                                       "loras": loras})
    assert r.status_code == 200, r.text
    return r


def test_an_adapter_by_url_gives_the_catalog_adapters_pixels_and_downloads_once(
        client, lora_server):
    url, gets = lora_server
    lora = f"{url}/watercolor.safetensors?first"
    by_url = _gen(client, FAST, [{"name": lora, "scale": 0.7}])
    by_name = _gen(client, FAST, [{"name": "watercolor", "scale": 0.7}])
    base = _gen(client, FAST, [])
    assert by_url.json()["image"] == by_name.json()["image"]
    assert np.abs(pixels(decode(by_url.json()["image"]))
                  - pixels(decode(base.json()["image"]))).mean() > 1
    held = by_url.headers["x-atelier-adapters-held"].split(",")
    assert any(h.startswith("url-") for h in held)
    again = [_gen(client, FAST, [{"name": lora}], seed=s) for s in (1, 2)]
    assert len({r.json()["image"] for r in again}) == 2
    assert gets["/watercolor.safetensors?first"] == 1


def test_replicate_flux_lora_weights_url_with_the_official_client(rep, client, lora_server):
    url, _ = lora_server
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
    ("huggingface.co/acme/style", FAST, "resolve/main/<file>.safetensors"),
    ("{url}/gone.safetensors", FAST, "gave HTTP 404"),
    ("{url}/neon.safetensors", FAST, "neon.safetensors has no unet LoRA weights"),
    ("{url}/pixel-art.safetensors", FLUX, "pixel-art.safetensors has no transformer LoRA"),
])
def test_bad_adapter_urls_get_a_clear_422_and_the_replica_keeps_serving(
        client, lora_server, ref, model, reason):
    url, _ = lora_server
    r = client.post("/generate", json={"prompt": "x", "model": model,
                                       "loras": [{"name": ref.format(url=url)}]})
    assert r.status_code == 422 and reason in r.text, r.text
    assert _gen(client, model, [], prompt="x").json()["seeds"] == [11]
