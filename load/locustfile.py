"""Locust user for Atelier, sending the same profiles as `python -m load.run`.

    locust -f load/locustfile.py --host http://127.0.0.1:8000
    ATELIER_PROFILE=mlperf ATELIER_API_KEY=... \\
        locust -f load/locustfile.py --headless -u 16 -r 4 -t 10m --host http://gpu-box:8000

Environment: ATELIER_PROFILE (default smoke), ATELIER_API_KEY, ATELIER_MODEL,
ATELIER_ADAPTERS (space-separated adapter names or LoRA file URLs for mixed-adapters;
default: the model's catalog), and ATELIER_SIZE / ATELIER_STEPS to run a 1024-pixel
profile on a small model. Locust users are closed loops (each waits for its answer);
`load.run` is the open-loop driver.
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

from load.profiles import PROFILES, sized


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


class AtelierUser(HttpUser):
    wait_time = between(0, 0.5)

    def on_start(self) -> None:
        self.profile = PROFILES[os.environ.get("ATELIER_PROFILE", "smoke")]
        key = os.environ.get("ATELIER_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.adapters = os.environ.get("ATELIER_ADAPTERS", "").split()
        self.rng = random.Random()
        self.sent = 0
        if self.adapters:
            return
        model = os.environ.get("ATELIER_MODEL")
        if not model:  # the server's first model, whose adapters the profiles may name
            r = self.client.get("/v1/models", name="/v1/models")
            model = r.json()["data"][0]["id"] if r.ok else None
        r = self.client.get("/v1/loras", params={"model": model} if model else {},
                            name="/v1/loras")
        self.adapters = [row["name"] for row in r.json()["data"]] if r.ok else []

    @task
    def generate(self) -> None:
        body = sized(self.profile.body(self.rng, self.sent, self.adapters),
                     _int_env("ATELIER_SIZE"), _int_env("ATELIER_STEPS"))
        if os.environ.get("ATELIER_MODEL"):
            body["model"] = os.environ["ATELIER_MODEL"]
        self.sent += 1
        with self.client.post("/generate", json=body, name=f"/generate [{self.profile.name}]",
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
            elif len(r.json()["images"]) != body.get("num_outputs", 1):
                r.failure("wrong number of images")
