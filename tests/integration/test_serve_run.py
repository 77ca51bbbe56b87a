"""`serve run` of the shipped Serve config starts the embedded default and answers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.integration.conftest import _free_port, decode

ROOT = Path(__file__).resolve().parents[2]


def test_serve_run_of_the_shipped_config_serves_the_embedded_model(tmp_path, cache_dir):
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    port = _free_port()
    config["http_options"]["port"] = port
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "ATELIER_CACHE_DIR": str(cache_dir), "RAY_ADDRESS": "local"}
    serve_cli = Path(sys.executable).parent / "serve"
    proc = subprocess.Popen([str(serve_cli), "run", str(tmp_path / "serve.yaml")], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "serve run exited"
            time.sleep(1)
        r = httpx.post(f"{url}/generate?prompt=a+red+cube&width=64&height=64&steps=2&seed=7",
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "atelier/tiny-sdxl"
        assert decode(r.json()["image"]).size == (64, 64)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
