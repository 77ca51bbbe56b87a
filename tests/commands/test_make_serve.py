"""`make serve`, as the README gives it: Ray with its metrics port, the shipped Serve config
on the embedded default, JSON logs, and everything stopped by one Ctrl-C.

These run before tests/integration starts its own Ray cluster on this machine (pytest
collects folders in name order).
"""

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import counts_by_model
from tests.integration.conftest import _free_port, decode

ROOT = Path(__file__).resolve().parents[2]


def _wait_healthy(url, proc, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, "make serve exited"
        time.sleep(1)
    raise TimeoutError("never healthy")


@pytest.fixture(scope="module")
def served(tmp_path_factory, cache_dir):
    """(app url, metrics url, Ray port, process) of a running `make serve`."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port = _free_port()
    path = tmp_path_factory.mktemp("make-serve") / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    ports = {"RAY_PORT": _free_port(), "METRICS_PORT": _free_port(),
             "DASHBOARD_PORT": _free_port()}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["ATELIER_CACHE_DIR"] = str(cache_dir)
    # Ctrl-C reaches a terminal's foreground job with SIGINT's default action, whatever
    # this test run inherited (a run started in the background ignores SIGINT, and so
    # would `make serve`): handled here, SIGINT is at its default in the child.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            ["make", "-s", "serve", f"SERVE_CONFIG={path}",
             *(f"{k}={v}" for k, v in ports.items())],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_healthy(url, proc)
        yield url, f"http://127.0.0.1:{ports['METRICS_PORT']}/metrics", ports["RAY_PORT"], proc
    finally:
        _interrupt(proc)


def _interrupt(proc, timeout_s: float = 60) -> bool:
    """Ctrl-C; whether `make serve` stopped by itself within `timeout_s` (if not, it is
    killed)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does in a terminal
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False
    return True


def test_make_serve_answers_on_the_embedded_model(served):
    url, *_ = served
    r = httpx.post(f"{url}/generate?prompt=a+red+cube&width=64&height=64&steps=2&seed=7",
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "atelier/tiny-sdxl"
    assert decode(r.json()["image"]).size == (64, 64)
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["family"]) for m in models] == [("atelier/tiny-sdxl", "sdxl"),
                                                       ("atelier/tiny-flux", "flux")]
    r = httpx.post(f"{url}/generate", timeout=60, json={
        "model": "black-forest-labs/flux-dev", "prompt": "a red cube", "width": 96,
        "height": 64, "steps": 2, "seed": 7})
    assert r.json()["model"] == "atelier/tiny-flux", r.text
    assert decode(r.json()["image"]).size == (96, 64)


def test_ray_exports_atelier_metrics_on_the_metrics_port(served):
    url, metrics, *_ = served
    for model in ("atelier/tiny-sdxl", "atelier/tiny-flux"):
        httpx.post(f"{url}/generate", json={"prompt": "x", "seed": 1, "model": model,
                                            "width": 64, "height": 64}, timeout=60)
    deadline, counts = time.monotonic() + 60, {}
    while time.monotonic() < deadline and len(counts) < 2:
        counts = counts_by_model(httpx.get(metrics, timeout=10).text,
                                 "ray_atelier_generated_images_total")
        time.sleep(1)
    assert set(counts) == {"atelier/tiny-sdxl", "atelier/tiny-flux"}
    assert all(n >= 1 for n in counts.values())


def test_logs_are_json_lines_with_the_request_and_prediction_ids(served):
    url, *_ = served
    rid = f"probe-{uuid.uuid4().hex}"
    r = httpx.post(f"{url}/v1/models/atelier/tiny-sdxl/predictions", timeout=70,
                   headers={"Prefer": "wait", "X-Request-Id": rid},
                   json={"input": {"prompt": "a cat", "seed": 2}})
    assert r.status_code == 201 and r.headers["x-request-id"] == rid
    pid = r.json()["id"]
    deadline, records = time.monotonic() + 30, []
    while time.monotonic() < deadline and not any(x.get("prediction_id") == pid
                                                  for x in records):
        time.sleep(0.5)
        records = [json.loads(line) for f in _recent_serve_logs()
                   for line in f.read_text().splitlines() if rid in line]
    ours = [x for x in records if x.get("prediction_id") == pid]
    assert ours and ours[0]["request_id"] == rid and ours[0]["status"] == "succeeded"


def test_each_model_replica_logs_its_device_and_the_dtypes_its_weights_are_in(served):
    ready = [json.loads(line)["message"] for f in _recent_serve_logs()
             for line in f.read_text().splitlines()
             if line.startswith("{") and " ready on " in line]  # JSON: this app's
    sdxl = [m for m in ready if m.startswith("atelier/tiny-sdxl ready on ")]
    flux = [m for m in ready if m.startswith("atelier/tiny-flux ready on ")]
    assert sdxl and flux, ready
    assert all(m.startswith("atelier/tiny-sdxl ready on cpu (weights: unet float32, vae "
                            "float32, text_encoder float32, text_encoder_2 float32, "
                            "controlnet canny float32, ip-adapter image_encoder float32): ")
               for m in sdxl), sdxl
    assert all("(weights: transformer float32, vae float32" in m for m in flux), flux


def _recent_serve_logs(within_s=900):
    """Serve replica logs of recent Ray sessions (the request id picks ours)."""
    now = time.time()
    return [f for f in Path("/tmp/ray").glob("session_*/logs/serve/replica_*.log")
            if now - f.stat().st_mtime < within_s]


def test_ctrl_c_stops_serve_and_ray(served):
    *_, ray_port, proc = served
    assert _interrupt(proc), "make serve still ran a minute after Ctrl-C"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", ray_port)) != 0:
                return  # Ray's GCS is gone
        time.sleep(1)
    pytest.fail("Ray's GCS still listens after Ctrl-C")
