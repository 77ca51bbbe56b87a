"""Latency of one request through each public API, side by side, on one running app.

    python -m load.bench_apis [--size 64 --rounds 30]

Every request uses the model's default steps and guidance (OpenAI's API has no steps).

Requests are interleaved (generate, replicate, openai, generate, ...) so drift in the
machine's speed hits every API alike. Prints medians and saves JSON
(default results/apis-<device>.json). Figures are what this run saw; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

from load.bench_serving import machine, start_atelier
from load.report import save_report


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--port", type=int, default=8078)
    p.add_argument("--out")
    return p.parse_args()


def _calls(args: argparse.Namespace, model: str) -> dict:
    size = {"width": args.size, "height": args.size}
    gen = {"prompt": "bench", "seed": 1, **size}
    rep = {"input": {"prompt": "bench", "seed": 1, **size}}
    oai = {"model": model, "prompt": "bench", "size": f"{args.size}x{args.size}"}
    return {
        "generate": lambda c: c.post("/generate", json=gen),
        "replicate_prefer_wait": lambda c: c.post(f"/v1/models/{model}/predictions", json=rep,
                                                  headers={"Prefer": "wait"}),
        "openai_b64": lambda c: c.post("/v1/images/generations", json=oai),
    }


def main() -> None:
    args = _parse_args()
    url, _ = start_atelier(args.port, {})  # the embedded default model
    latencies: dict[str, list[float]] = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        calls = _calls(args, model)
        for call in calls.values():  # one warm call each
            call(client).raise_for_status()
        for _ in range(args.rounds):
            for name, call in calls.items():
                started = time.perf_counter()
                call(client).raise_for_status()
                latencies.setdefault(name, []).append(time.perf_counter() - started)
    medians = {name: statistics.median(v) * 1000 for name, v in latencies.items()}
    base = medians["generate"]
    report = {"settings": vars(args), "machine": machine(), "median_ms": medians,
              "overhead_over_generate_ms": {n: m - base for n, m in medians.items()}}
    for name, ms in medians.items():
        print(f"{name:>24}: median {ms:7.1f} ms  ({ms - base:+.1f} ms vs /generate)")
    save_report(report, args.out, f"apis-{'gpu' if 'gpu' in report['machine'] else 'cpu'}")


if __name__ == "__main__":
    main()
