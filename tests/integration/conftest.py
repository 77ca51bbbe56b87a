"""A real Ray Serve app over real HTTP, with two models built from the embedded tiny SDXL.

`atelier/tiny-sdxl` batches with a short window (most tests), has the tiny refiner and a
`cinematic` style; `atelier/tiny-sdxl-batched`
waits two seconds for company, so concurrent requests reliably share pipeline calls;
`atelier/tiny-sdxl-one-slot` holds one request and queues one more, to show overload;
`atelier/tiny-sdxl-2x` has two replicas, to show adapter affinity, and reads prompts in
up to two chunks with weights;
`atelier/tiny-sdxl-restartable` is the one whose replica the fault tests kill;
`atelier/tiny-sdxl-deadline` gives synchronous requests 1.5 s;
`atelier/tiny-sdxl-small-memory` runs out of memory on calls of more than two images
(the out-of-memory drill) and budgets 3 images of 64x64 per request;
`atelier/tiny-sdxl-stall` counts a pipeline call of over 1.5 s as wedged;
`atelier/tiny-sdxl-checked` has a safety checker that flags the image of CHECKED_PROMPT's
seed 10 and passes that of seed 11; `atelier/tiny-sdxl-inpainting` is the embedded tiny
SDXL inpainting checkpoint (a 9-channel UNet), which runs every request as inpainting;
`atelier/tiny-flux` is the embedded tiny FLUX, with fused projections, FP8 layers and
its adapters merged into them, and the tiny union ControlNet as canny, edges, depth
(estimating a picture's depth with the tiny Depth Anything) and depth-map;
`atelier/tiny-flux-kontext` is the embedded tiny FLUX.1 Kontext, whose input images are
references to edit (and which reads image prompts with the tiny Redux);
`atelier/tiny-flux-fill` the embedded tiny FLUX.1 Fill, which fills masked images (and
reads image prompts with the tiny Redux); `atelier/tiny-flux-canny` the embedded tiny
FLUX.1 Canny, which follows an image's edges; `atelier/tiny-flux-depth` the embedded tiny
FLUX.1 Depth with the tiny Depth Anything, which follows an image's depth (and reads
image prompts with the tiny Redux); `atelier/tiny-flux-redux` the tiny FLUX with
the embedded tiny FLUX.1 Redux, which reads image prompts (waiting half a second for
company). The adapter catalog is the embedded demo set plus
`bad_adapters` (files that must fail cleanly), `made_adapters` (made with PEFT and saved by
diffusers, text-encoder parts and metadata alphas) and `named_adapters` (filed by Replicate
model name). Request bodies over 2 MiB get 413; input images and LoRA files may be
fetched from 127.0.0.1.
"""

import asyncio
import base64
import io
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import FileServer
from tests.conftest import free_port as _free_port

FAST, BATCHED = "atelier/tiny-sdxl", "atelier/tiny-sdxl-batched"
ONE_SLOT = "atelier/tiny-sdxl-one-slot"
API_KEY = "test-key-7f3a"
LIMITED_KEY = "test-key-limited-91c2"  # 3 generation requests per minute
IMAGES_KEY = "test-key-images-5d0e"  # 6 images per minute
# May use the batched SDXL and FLUX (by an alias) only; its requests have priority 5.
MODELS_KEY = "test-key-models-3b8e"
OPS_KEY = "test-key-ops-61f0"  # sees every key's predictions
URGENT_KEY = "test-key-urgent-8d21"  # its requests have priority 9
QUEUE_KEY = "test-key-queue-4c7a"  # at most 2 unfinished predictions
URGENT_SECRET = "whsec_" + "dGVhbS1kIHNpZ25zIGl0cyB3ZWJob29rcyB3aXRoIHRoaXM="  # team-d's own
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TWO_REPLICAS = "atelier/tiny-sdxl-2x"
RESTARTABLE = "atelier/tiny-sdxl-restartable"
DEADLINE = "atelier/tiny-sdxl-deadline"
SMALL_MEMORY = "atelier/tiny-sdxl-small-memory"
STALL = "atelier/tiny-sdxl-stall"
FLUX = "atelier/tiny-flux"
KONTEXT = "atelier/tiny-flux-kontext"
FILL = "atelier/tiny-flux-fill"
CANNY = "atelier/tiny-flux-canny"
REDUX = "atelier/tiny-flux-redux"
DEPTH = "atelier/tiny-flux-depth"
CHECKED = "atelier/tiny-sdxl-checked"
INPAINTING = "atelier/tiny-sdxl-inpainting"
AUTOSCALED = "atelier/tiny-sdxl-autoscaled"  # one replica, two under load
CHECKED_PROMPT = "a scene for the safety checker"
# Replicate's versions of stability-ai/sdxl and nightmareai/real-esrgan, pinned to FAST.
SDXL_VERSION = "39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b"
ESRGAN_VERSION = "f121d640bd286e1fdc67f9799164c1d5be36ff74576ee11c803ae5b665dd46aa"
MAX_BODY_BYTES = 2 * 2**20
STUDIO = "http://studio.test:5173"  # the one origin whose browser apps may call


def _model(model_id, wait_ms, **extra):
    return {"id": model_id, "embedded": "tiny-sdxl", "dtype": "float32", "num_cpus": 1,
            "batching": {"max_batch_size": 4, "wait_ms": wait_ms},
            "limits": {"max_size": 512, "max_pixels": 256 * 256, "max_steps": 20},
            "defaults": {"width": 64, "height": 64, "num_inference_steps": 2}, **extra}


@pytest.fixture(scope="session")
def bad_adapters(tmp_path_factory, cache_dir):
    """A folder for sdxl with a truncated file and a shape mismatch, and one for another
    base model, each made from a real demo adapter."""
    from safetensors.torch import load_file, save_file

    from deployments.tiny import TINY_SDXL_DEMO, ensure_demo_loras

    demo = ensure_demo_loras(TINY_SDXL_DEMO, cache_dir) / "pixel-art.safetensors"
    sdxl, other = tmp_path_factory.mktemp("bad-sdxl"), tmp_path_factory.mktemp("other-base")
    (sdxl / "truncated.safetensors").write_bytes(demo.read_bytes()[:-4096])
    state = load_file(demo)
    save_file({k: (v.repeat(1, 2) if "lora_A" in k else v) for k, v in state.items()},
              str(sdxl / "wrong-shape.safetensors"))
    (sdxl / "pickled.bin").write_bytes(b"not allowed")
    save_file(state, str(other / "for-other.safetensors"))
    return sdxl, other


@pytest.fixture(scope="session")
def made_adapters(tmp_path_factory, tiny_sdxl_path):
    """An sdxl folder of adapters made with PEFT and saved by diffusers' writer, with each
    model's LoraConfig in the file (alpha twice the rank): "lettered" changes the UNet and
    both text encoders, "lettered-unet" holds its UNet part alone, "dora" is DoRA."""
    from diffusers import StableDiffusionXLPipeline

    from tests.lora_files import (
        RANK,
        TE_TARGETS,
        UNET_TARGETS,
        lora_config,
        random_lora,
        save_lora,
    )

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    doubled = {"lora_alpha": 2 * RANK}
    parts = {prefix: (random_lora(model, targets, seed, **doubled),
                      lora_config(targets, **doubled))
             for seed, (prefix, model, targets) in enumerate((
                 ("unet", pipe.unet, UNET_TARGETS),
                 ("text_encoder", pipe.text_encoder, TE_TARGETS),
                 ("text_encoder_2", pipe.text_encoder_2, TE_TARGETS)))}
    folder = tmp_path_factory.mktemp("made-adapters")
    save_lora(folder, "lettered", parts)
    save_lora(folder, "lettered-unet", {"unet": parts["unet"]})
    dora = {"use_dora": True}
    save_lora(folder, "dora", {"unet": (random_lora(pipe.unet, UNET_TARGETS, 9, **dora),
                                             lora_config(UNET_TARGETS, **dora))})
    return folder


@pytest.fixture(scope="session")
def named_adapters(tmp_path_factory, cache_dir):
    """A FLUX folder laid out by Replicate model name: `acme/ink-style` is the demo `ink`,
    `acme/ink-style/v2` the demo `neon`."""
    from deployments.tiny import TINY_FLUX_DEMO, ensure_demo_loras

    demo = ensure_demo_loras(TINY_FLUX_DEMO, cache_dir)
    folder = tmp_path_factory.mktemp("by-model-name")
    (folder / "acme" / "ink-style").mkdir(parents=True)
    shutil.copy(demo / "ink.safetensors", folder / "acme" / "ink-style.safetensors")
    shutil.copy(demo / "neon.safetensors", folder / "acme" / "ink-style" / "v2.safetensors")
    return folder


@pytest.fixture(scope="session")
def safety_checker(cache_dir, tmp_path_factory):
    """The folder of CHECKED's safety checker, its concepts made from the model's own
    images of CHECKED_PROMPT: seed 10's flagged, seed 11's passed."""
    from deployments.engines import create_engine
    from serve.config import ModelConfig
    from serve.types import GenerationRequest
    from tests.safety import save_checker

    model = ModelConfig.model_validate(_model(CHECKED, 10))
    engine = create_engine(model, cache_dir, None)
    (flagged, kept), = engine.generate([GenerationRequest.for_model(
        model, CHECKED_PROMPT, seed=10, num_outputs=2)])
    folder = tmp_path_factory.mktemp("safety-checker")
    save_checker(folder, [flagged], [kept])
    return folder


@pytest.fixture(scope="session")
def two_ip_adapters(cache_dir, tiny_sdxl_path, tmp_path_factory):
    """BATCHED's IP-Adapters: the tiny one first, and a "plus" one as its `face`."""
    from tests.ip_adapters import two_adapters

    return two_adapters(tmp_path_factory.mktemp("ip-adapters"), cache_dir, tiny_sdxl_path)


@pytest.fixture(scope="session")
def metrics_port():
    """Ray's metrics export port for the test cluster (scraped by the Prometheus test)."""
    return _free_port()


@pytest.fixture(scope="session")
def signing_files(tmp_path_factory):
    from tests.credentials import save_signing_files

    return save_signing_files(tmp_path_factory.mktemp("signing"))


# Package scope: the app and its Ray cluster stop once the integration tests are done, so
# that their idle replicas do not take CPU from the tests run after them.
@pytest.fixture(scope="package")
def base_url(cache_dir, bad_adapters, made_adapters, named_adapters, metrics_port,
             safety_checker, signing_files, two_ip_adapters):
    import ray
    from ray import serve

    from serve.app import build_app
    from tests.integration.session_app import session_config

    config = session_config(cache_dir, bad_adapters, made_adapters, named_adapters,
                            safety_checker, signing_files, two_ip_adapters)
    # The dashboard writes Ray's Prometheus service-discovery file.
    ray.init(address="local", num_cpus=24, include_dashboard=True, dashboard_port=_free_port(),
             _metrics_export_port=metrics_port)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    serve.run(build_app({"atelier": config}), name="atelier", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def lora_server(cache_dir):
    """Serves the demo adapters' files as /<name>.safetensors from 127.0.0.1 (a host in
    the app's lora_allowed_hosts)."""
    from deployments.tiny import TINY_FLUX_DEMO, TINY_SDXL_DEMO, ensure_demo_loras

    server = FileServer({f"/{p.name}": p.read_bytes()
                         for demo in (TINY_SDXL_DEMO, TINY_FLUX_DEMO)
                         for p in ensure_demo_loras(demo, cache_dir).glob("*.safetensors")})
    yield server
    server.close()


@pytest.fixture
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60, headers=AUTH) as c:
        yield c


@pytest.fixture
def rep(base_url):
    """The official Replicate client, pointed at the app."""
    import replicate

    return replicate.Client(api_token=API_KEY, base_url=base_url)


@pytest.fixture
def oai(base_url):
    """The official OpenAI client, pointed at the app."""
    import openai

    return openai.OpenAI(api_key=API_KEY, base_url=f"{base_url}/v1", max_retries=0)


def post_misframed(url, files, **fields):
    """POST a multipart body whose parts are framed by another boundary than the header
    names (data a multipart parser refuses)."""
    body = httpx.Request("POST", url, files=files, data=fields).read()
    headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=not-the-one-used"}
    return httpx.post(url, content=body, headers=headers, timeout=60)


def post_many(base_url, bodies, path="/generate", lead_s=0.02):
    """POST the bodies concurrently, the first `lead_s` ahead of the others (which are
    20 ms apart); return the responses in the same order."""

    async def run():
        async with httpx.AsyncClient(base_url=base_url, timeout=60, headers=AUTH) as c:
            tasks = []
            for i, body in enumerate(bodies):
                tasks.append(asyncio.create_task(c.post(path, json=body)))
                await asyncio.sleep(lead_s if i == 0 else 0.02)  # arrival order as given
            return await asyncio.gather(*tasks)

    return asyncio.run(run())


def ray_session_dir() -> Path:
    """The test cluster's Ray session folder (its logs are under `logs/`)."""
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path())  # no public accessor


def replica_log(deployment: str, request_id: str, timeout_s: float = 15) -> list[str]:
    """The lines the replicas of `deployment` logged with `request_id` (sent as the
    request's X-Request-Id), once its call's own line (`CALL <method> <status>`) is there."""
    logs, deadline = ray_session_dir() / "logs" / "serve", time.monotonic() + timeout_s
    while True:
        lines = [line for f in logs.glob(f"replica_atelier_{deployment}_*.log")
                 for line in f.read_text(errors="replace").splitlines() if request_id in line]
        if any(" -- CALL " in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def noise(seed: int, size: tuple[int, int]) -> Image.Image:
    """An RGB picture of `size` (width, height) of random pixels, the same for a seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def decode(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(data))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def same_pixels(a: str, b: str) -> bool:
    """Whether two base64 PNGs hold the same pixels (their bytes differ: each image's
    Content Credentials are signed on their own)."""
    return np.array_equal(pixels(decode(a)), pixels(decode(b)))


def assert_same_pixels(a, b):
    """Equal up to one 8-bit level on under 1 % of values (batched float sums may round
    the other way on a boundary; see tests/unit/test_engine.py)."""
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() < 0.01
