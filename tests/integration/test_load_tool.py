"""The load tool against the running app: the CI smoke profile, overload, and Locust."""

import asyncio
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from load.run import main as load_main
from tests.integration.conftest import (
    API_KEY,
    AUTH,
    BATCHED,
    FAST,
    FILL,
    FLUX,
    KONTEXT,
    ONE_SLOT,
    REDUX,
    TWO_REPLICAS,
)

ROOT = Path(__file__).resolve().parents[2]


def _run(base_url, tmp_path, *extra):
    out = tmp_path / "report.json"
    load_main(["--url", base_url, "--api-key", API_KEY, "--out", str(out), *extra])
    return json.loads(out.read_text()), out.with_suffix(".png")


def test_the_smoke_profile_reports_throughput_latency_cost_and_a_plot(base_url, tmp_path):
    report, png = _run(base_url, tmp_path, "--profile", "smoke", "--model", FAST,
                       "--rates", "2", "6", "--requests", "12", "--gpu-hour-usd", "3.6",
                       "--api-price-usd", "0.004")
    assert [lv["offered_rps"] for lv in report["levels"]] == [2.0, 6.0]
    for lv in report["levels"]:
        assert lv["sent"] == lv["succeeded"] == 12 and lv["errors"] == {}
        lat = lv["latency_s"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] < 60
        assert 0 < lv["goodput_img_s"] <= lv["throughput_img_s"]
    # The test cluster lists CPUs and no GPU: priced as one GPU.
    assert report["hardware"] == [{"sku": "cpu", "name": "CPU", "count": 24, "servers": 1}]
    c = report["cost"]
    assert c["gpus"] == 1
    best = max(lv["goodput_img_s"] for lv in report["levels"])
    assert c["usd_per_image_at_capacity"] == pytest.approx(3.6 / 3600 / best)
    assert c["break_even_img_month"] == pytest.approx(3.6 * 730 / 0.004)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 600


def test_overload_is_counted_by_kind_not_lost(base_url, tmp_path):
    report, _ = _run(base_url, tmp_path, "--profile", "smoke", "--model", ONE_SLOT,
                     "--rates", "40", "--requests", "10", "--arrival", "bursty",
                     "--burst", "10")
    (lv,) = report["levels"]
    assert lv["errors"].get("overload", 0) >= 5  # one runs, one queues, the rest are refused
    assert lv["succeeded"] + sum(lv["errors"].values()) == lv["sent"] == 10


def test_the_locust_file_drives_the_server(base_url, tmp_path):
    env = {**os.environ, "ATELIER_API_KEY": API_KEY, "ATELIER_MODEL": FAST,
           "ATELIER_PROFILE": "smoke"}
    locust = Path(sys.executable).parent / "locust"
    subprocess.run([str(locust), "-f", str(ROOT / "load" / "locustfile.py"), "--headless",
                    "-u", "2", "-r", "2", "-t", "6s", "--host", base_url,
                    "--csv", str(tmp_path / "run"), "--only-summary"],
                   env=env, cwd=tmp_path, check=True, capture_output=True, timeout=120)
    with open(tmp_path / "run_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    generate = rows["/generate [smoke]"]
    assert int(generate["Request Count"]) >= 4 and int(generate["Failure Count"]) == 0


def test_the_product_variations_profile_sends_the_photo_for_img2img(base_url, tmp_path):
    import base64
    import io
    import random

    from load.profiles import PROFILES

    profile = PROFILES["product-variations"]
    bodies = [profile.body(random.Random(0), i, []) for i in range(10)]
    assert len({b["image"] for b in bodies[:5]}) == 1 and bodies[5]["image"] != bodies[0]["image"]
    assert {b["prompt_strength"] for b in bodies} == {0.75}
    photo = Image.open(io.BytesIO(base64.b64decode(bodies[0]["image"].split(",", 1)[1])))
    assert (photo.format, photo.size) == ("JPEG", (1024, 1024))
    report, _ = _run(base_url, tmp_path, "--profile", "product-variations", "--model", FAST,
                     "--size", "64", "--steps", "4", "--rates", "4", "--requests", "10")
    (lv,) = report["levels"]
    assert lv["sent"] == lv["succeeded"] == 10 and lv["errors"] == {}


def test_the_adapter_profile_names_only_adapters_of_the_target_model(base_url, tmp_path):
    """The catalog also holds SDXL adapters; on the FLUX model any of them would be a 422."""
    import random

    from load.profiles import PROFILES
    from load.run import _adapters

    async def flux_adapters():
        import httpx

        async with httpx.AsyncClient(base_url=base_url, headers=AUTH) as client:
            return await _adapters(client, FLUX), await _adapters(client, None)

    flux, default = asyncio.run(flux_adapters())
    assert sorted(flux) == ["acme/ink-style", "acme/ink-style/v2", "film-grain", "ink", "neon"]
    assert "pixel-art" in default and "acme/ink-style" not in default
    rng = random.Random(0)
    bodies = [PROFILES["mixed-adapters"].body(rng, i, flux) for i in range(100)]
    assert {b["loras"][0]["name"] for b in bodies if "loras" in b} == set(flux)
    report, _ = _run(base_url, tmp_path, "--profile", "mixed-adapters", "--model", FLUX,
                     "--size", "64", "--steps", "4", "--rates", "4", "--requests", "9")
    (lv,) = report["levels"]
    assert lv["sent"] == lv["succeeded"] == 9 and lv["errors"] == {}


def test_the_adapter_profile_sends_lora_file_urls_the_server_downloads(base_url, tmp_path,
                                                                        lora_server):
    urls = [f"{lora_server.url}/{name}.safetensors?load-tool" for name in ("watercolor",
                                                                           "pixel-art")]
    report, _ = _run(base_url, tmp_path, "--profile", "mixed-adapters", "--model", FAST,
                     "--adapters", *urls, "--size", "64", "--steps", "2", "--rates", "4",
                     "--requests", "9")
    (lv,) = report["levels"]
    assert lv["sent"] == lv["succeeded"] == 9 and lv["errors"] == {}
    fetched = [p for p in lora_server.paths if p.endswith("?load-tool")]
    # Each adapter drawn was downloaded once by the model's replica, then held.
    assert fetched and sorted(set(fetched)) == sorted(fetched)
    assert {f"{lora_server.url}{p}" for p in fetched} <= set(urls)


def test_the_refiner_profile_asks_for_the_refiner(base_url, tmp_path):
    import random

    from load.profiles import PROFILES

    body = PROFILES["refiner"].body(random.Random(0), 0, [])
    assert (body["refine"], body["high_noise_frac"], body["steps"]) == (
        "expert_ensemble_refiner", 0.8, 30)
    lv = _level(base_url, tmp_path, "refiner", FAST, requests=6, steps=5)
    assert lv["sent"] == lv["succeeded"] == 6 and lv["errors"] == {}
    # A model without a refiner refuses every such request before queueing it.
    lv = _level(base_url, tmp_path, "refiner", BATCHED, requests=4, steps=5)
    assert lv["succeeded"] == 0 and lv["errors"] == {"validation": 4}


def _level(base_url, tmp_path, profile: str, model: str, requests: int, steps: int) -> dict:
    """The one rate level of a run of `profile` on `model` at 64x64 and 4 requests/s."""
    report, _ = _run(base_url, tmp_path, "--profile", profile, "--model", model, "--size",
                     "64", "--steps", str(steps), "--rates", "4", "--requests", str(requests))
    (lv,) = report["levels"]
    return lv


def test_the_image_prompt_profile_sends_mood_boards_every_other_request(base_url, tmp_path):
    import random

    from load.profiles import PROFILES

    bodies = [PROFILES["image-prompts"].body(random.Random(0), i, []) for i in range(8)]
    boards = [b.get("ip_adapter_image") for b in bodies]
    assert boards[1::2] == [None] * 4 and [len(b) for b in boards[0::2]] == [1, 2, 3, 1]
    assert boards[0] == boards[6] and len({p for b in boards for p in b or ()}) == 6
    assert all(p.startswith("data:image/jpeg;base64,") for p in boards[4])
    lv = _level(base_url, tmp_path, "image-prompts", FAST, requests=6, steps=4)
    assert lv["sent"] == lv["succeeded"] == 6 and lv["errors"] == {}
    # A model without an IP-Adapter refuses the prompted half before queueing them.
    lv = _level(base_url, tmp_path, "image-prompts", TWO_REPLICAS, requests=6, steps=4)
    assert lv["succeeded"] == 3 and lv["errors"] == {"validation": 3}


def test_the_kontext_profile_edits_each_product_photo_five_ways(base_url, tmp_path):
    import random

    from load.profiles import PROFILES

    bodies = [PROFILES["kontext-edits"].body(random.Random(0), i, []) for i in range(10)]
    assert len({b["prompt"] for b in bodies[:5]}) == 5
    assert len({b["image"] for b in bodies[:5]}) == 1 and bodies[0]["image"] != bodies[5]["image"]
    assert "prompt_strength" not in bodies[0] and bodies[0]["guidance_scale"] == 2.5
    lv = _level(base_url, tmp_path, "kontext-edits", KONTEXT, requests=5, steps=2)
    assert lv["sent"] == lv["succeeded"] == 5 and lv["errors"] == {}


def test_the_fill_profile_outpaints_each_product_photo_into_five_banners(base_url, tmp_path):
    import base64
    import io
    import random

    import numpy as np

    from load.profiles import PROFILES

    bodies = [PROFILES["fill-banners"].body(random.Random(0), i, []) for i in range(10)]
    assert len({b["prompt"] for b in bodies[:5]}) == 5
    assert len({b["image"] for b in bodies[:5]}) == 1 and bodies[0]["image"] != bodies[5]["image"]
    canvas = np.asarray(Image.open(io.BytesIO(base64.b64decode(
        bodies[0]["image"].split(",", 1)[1]))))
    assert canvas.shape == (768, 1344, 4) and (bodies[0]["width"], bodies[0]["height"]) == (
        1344, 768)
    alpha = canvas[..., 3]
    assert alpha[:, :288].max() == 0 and alpha[:, 1056:].max() == 0
    assert alpha[:, 288:1056].min() == 255  # the photo, kept; the sides, filled
    lv = _level(base_url, tmp_path, "fill-banners", FILL, requests=5, steps=2)
    assert lv["sent"] == lv["succeeded"] == 5 and lv["errors"] == {}


def test_the_redux_profile_varies_each_product_photo_five_times_without_a_prompt(
        base_url, tmp_path):
    import random

    from load.profiles import PROFILES

    rng = random.Random(0)
    bodies = [PROFILES["redux-variations"].body(rng, i, []) for i in range(10)]
    assert all("prompt" not in b for b in bodies)
    assert len({b["redux_image"] for b in bodies[:5]}) == 1
    assert bodies[0]["redux_image"] != bodies[5]["redux_image"]
    assert len({b["seed"] for b in bodies}) == 10
    lv = _level(base_url, tmp_path, "redux-variations", REDUX, requests=5, steps=2)
    assert lv["sent"] == lv["succeeded"] == 5 and lv["errors"] == {}
    # A FLUX model without Redux refuses them, naming the field, before queueing them.
    lv = _level(base_url, tmp_path, "redux-variations", FLUX, requests=5, steps=2)
    assert lv["succeeded"] == 0 and lv["errors"] == {"validation": 5}


def test_the_flux_controlnet_profile_redraws_each_product_photo_along_its_edges(
        base_url, tmp_path):
    import random

    from load.profiles import PROFILES

    bodies = [PROFILES["flux-controlnet"].body(random.Random(0), i, []) for i in range(10)]
    assert len({b["prompt"] for b in bodies[:5]}) == 5
    assert len({b["control_image"] for b in bodies[:5]}) == 1
    assert bodies[0]["control_image"] != bodies[5]["control_image"]
    assert {(b["controlnet"], b["controlnet_conditioning_scale"]) for b in bodies} == {
        ("canny", 0.5)}
    lv = _level(base_url, tmp_path, "flux-controlnet", FLUX, requests=5, steps=2)
    assert lv["sent"] == lv["succeeded"] == 5 and lv["errors"] == {}
    # A FLUX model without ControlNets refuses them, naming the field, before queueing them.
    lv = _level(base_url, tmp_path, "flux-controlnet", REDUX, requests=5, steps=2)
    assert lv["succeeded"] == 0 and lv["errors"] == {"validation": 5}


def test_the_upscale_profile_enlarges_each_photo_without_a_step(base_url, tmp_path):
    import random

    from load.profiles import PROFILES

    bodies = [PROFILES["upscale"].body(random.Random(0), i, []) for i in range(3)]
    assert len({b["image"] for b in bodies}) == 3
    assert (bodies[0]["prompt_strength"], bodies[0]["upscale"]) == (0, 4)
    lv = _level(base_url, tmp_path, "upscale", FAST, requests=3, steps=2)
    assert lv["sent"] == lv["succeeded"] == 3 and lv["errors"] == {}


def test_the_retouch_profile_repaints_each_photos_label_area_five_times(base_url, tmp_path):
    import random

    from load.profiles import PROFILES

    bodies = [PROFILES["retouch"].body(random.Random(0), i, []) for i in range(10)]
    assert len({b["image"] for b in bodies[:5]}) == 1 and bodies[0]["image"] != bodies[5]["image"]
    assert len({b["mask"] for b in bodies}) == 1 and bodies[0]["padding_mask_crop"] == 32
    assert bodies[0]["width"] == 1024 and bodies[0]["prompt_strength"] == 0.75
    lv = _level(base_url, tmp_path, "retouch", FAST, requests=5, steps=2)
    assert lv["sent"] == lv["succeeded"] == 5 and lv["errors"] == {}
