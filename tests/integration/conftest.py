"""A real Ray Serve app over real HTTP, with two models built from the embedded tiny SDXL.

`atelier/tiny-sdxl` batches with a short window (most tests); `atelier/tiny-sdxl-batched`
waits two seconds for company, so concurrent requests reliably share pipeline calls;
`atelier/tiny-sdxl-one-slot` holds one request and queues one more, to show overload.
"""

import asyncio
import base64
import io
import socket

import httpx
import numpy as np
import pytest
from PIL import Image

FAST, BATCHED = "atelier/tiny-sdxl", "atelier/tiny-sdxl-batched"
ONE_SLOT = "atelier/tiny-sdxl-one-slot"


def _model(model_id, wait_ms, **extra):
    return {"id": model_id, "embedded": "tiny-sdxl", "dtype": "float32", "num_cpus": 1,
            "batching": {"max_batch_size": 4, "wait_ms": wait_ms},
            "limits": {"max_size": 512, "max_pixels": 256 * 256, "max_steps": 20},
            "defaults": {"width": 64, "height": 64, "num_inference_steps": 2}, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def base_url(cache_dir):
    import ray
    from ray import serve

    from serve.app import build_app

    config = {"cache_dir": str(cache_dir), "models": [
        _model(FAST, 10, aliases=["stability-ai/sdxl"]), _model(BATCHED, 2000),
        _model(ONE_SLOT, 1500, max_ongoing_requests=1, max_queued_requests=1,
               batching={"max_batch_size": 1, "wait_ms": 1500})]}
    ray.init(num_cpus=4, include_dashboard=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    serve.run(build_app({"atelier": config}), name="atelier", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def post_many(base_url, bodies, path="/generate"):
    """POST the bodies concurrently; return the responses in the same order."""

    async def run():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
            tasks = []
            for body in bodies:
                tasks.append(asyncio.create_task(c.post(path, json=body)))
                await asyncio.sleep(0.02)  # arrival order is the order given
            return await asyncio.gather(*tasks)

    return asyncio.run(run())


def decode(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(data))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def assert_same_pixels(a, b):
    """Equal up to one 8-bit level on under 1 % of values (batched float sums may round
    the other way on a boundary; see tests/unit/test_engine.py)."""
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() < 0.01
