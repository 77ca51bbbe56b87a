"""Serving benchmark: start Atelier, then measure start-up, latency and throughput over HTTP.

    python -m load.bench_serving                                  # embedded tiny model, CPU
    python -m load.bench_serving --random-sdxl ../shared/gpu/sdxl-base-configs.json \\
        --size 1024 --steps 20 --batch 8 --concurrency 1 8 16     # full SDXL architecture
    python -m load.bench_serving --prompt-chunks 3 --prompt-words 0 100 200  # long prompts

Prints a table and writes JSON (default results/serving-<device>.json). Figures are what
this run saw on this machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time

import httpx

from load.report import save_report


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="Atelier YAML config (default: the embedded tiny model)")
    p.add_argument("--random-sdxl", help="build an SDXL with random weights from this JSON of "
                                         "component configs and serve it")
    p.add_argument("--size", type=int, default=64, help="width and height of each image")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--guidance-mix", type=float, nargs="+", help=(
        "clients' guidance scales instead of --guidance: client i (and single request i) "
        "sends the i-th, cycling"))
    p.add_argument("--prompt-words", type=int, nargs="+", help=(
        "words added to each client's prompt: client i (and single request i) adds the "
        "i-th count, cycling (SDXL reads 75 tokens a chunk; see --prompt-chunks)"))
    p.add_argument("--prompt-chunks", type=int, default=0, help=(
        "serve the model with prompts.chunks at this (the embedded SDXL alone, or the "
        "random SDXL)"))
    p.add_argument("--batch", type=int, default=8, help="max_batch_size (random-sdxl only)")
    p.add_argument("--wait-ms", type=float, default=20, help="batch window (random-sdxl only)")
    p.add_argument("--single", type=int, default=20, help="sequential requests for latency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--duration", type=float, default=20, help="seconds per concurrency level")
    p.add_argument("--port", type=int, default=8077)
    p.add_argument("--out", help="JSON output path")
    return p.parse_args(argv)


def _app_args(args: argparse.Namespace) -> dict:
    if args.config:
        return {"config": args.config}
    prompts = {"prompts": {"chunks": args.prompt_chunks}} if args.prompt_chunks else {}
    if not args.random_sdxl and not prompts:
        return {}
    if not args.random_sdxl:
        from serve.config import DEFAULT_MODEL_ID

        return {"atelier": {"models": [{
            "id": DEFAULT_MODEL_ID, "embedded": "tiny-sdxl", "dtype": "float32",
            "defaults": {"width": args.size, "height": args.size,
                         "num_inference_steps": args.steps}, **prompts}]}}
    from load.bench_models import model_folder
    from serve.config import default_cache_dir

    folder = model_folder(args.random_sdxl, default_cache_dir())
    return {"atelier": {"models": [{
        "id": "bench/random-sdxl", "path": str(folder), "dtype": "float16", "num_cpus": 4,
        "max_ongoing_requests": max(64, args.batch * 4), "max_queued_requests": 1024,
        "batching": {"max_batch_size": args.batch, "wait_ms": args.wait_ms},
        "limits": {"max_size": 2048, "max_pixels": 2048 * 2048, "max_steps": 100},
        "defaults": {"width": args.size, "height": args.size,
                     "num_inference_steps": args.steps}, **prompts}]}}


def start_atelier(port: int, app_args: dict) -> tuple[str, float]:
    """Deploy the app; return its URL and the seconds from deploy to /healthz 200."""
    import ray
    from ray import serve

    from serve.app import build_app

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600})
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    serve.run(build_app(app_args), name="atelier", route_prefix="/")
    while httpx.get(f"{url}/healthz", timeout=30).status_code != 200:
        time.sleep(0.2)
    return url, time.monotonic() - started


def _body(args: argparse.Namespace, seed: int, client: int = 0) -> dict:
    scales = getattr(args, "guidance_mix", None) or [args.guidance]  # (bench_throughput: none)
    words = getattr(args, "prompt_words", None) or [0]
    prompt = " ".join([f"benchmark image {seed}"] + ["the"] * words[client % len(words)])
    return {"prompt": prompt, "width": args.size, "height": args.size,
            "steps": args.steps, "seed": seed, "guidance_scale": scales[client % len(scales)]}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def single(url: str, args: argparse.Namespace) -> dict:
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for i in range(args.single):
            started = time.monotonic()
            r = await client.post("/generate", json=_body(args, i, i))
            r.raise_for_status()
            latencies.append(time.monotonic() - started)
    return {"requests": len(latencies), "p50_s": _pct(latencies, 0.5),
            "p95_s": _pct(latencies, 0.95), "mean_s": statistics.fmean(latencies),
            "first_s": latencies[0]}


async def closed_loop(url: str, args: argparse.Namespace, concurrency: int) -> dict:
    """`concurrency` clients, each sending its next request when the last one returns.
    With Atelier, the pipeline calls its answers name are summed up too (`calls_summary`)."""
    latencies, batch_sizes, images = [], [], 0
    calls: dict[str, tuple[str, int, float]] = {}
    done: list[tuple[str, float, int]] = []  # (call, when answered, images)
    deadline = time.monotonic() + args.duration

    async def worker(wid: int) -> None:
        nonlocal images
        seq = 0
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            while time.monotonic() < deadline:
                started = time.monotonic()
                r = await client.post("/generate",
                                      json=_body(args, wid * 100_000 + seq, wid))
                r.raise_for_status()
                latencies.append(time.monotonic() - started)
                batch_sizes.append(int(r.headers.get("x-atelier-batch-size", 1)))
                if "x-atelier-batch-id" in r.headers:
                    calls[r.headers["x-atelier-batch-id"]] = (
                        r.headers["x-atelier-replica"], batch_sizes[-1],
                        float(r.headers["x-atelier-inference-ms"]) / 1000)
                made = len(r.json()["images"])
                images += made
                done.append((r.headers.get("x-atelier-batch-id", f"{wid}-{seq}"),
                             time.monotonic(), made))
                seq += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.monotonic() - started
    return {"concurrency": concurrency, "images": images, "seconds": elapsed,
            "images_per_s": images / elapsed, "p50_s": _pct(latencies, 0.5),
            "p95_s": _pct(latencies, 0.95), "p99_s": _pct(latencies, 0.99),
            "mean_batch_size": statistics.fmean(batch_sizes),
            "steady_images_per_s": steady_rate(done),
            **calls_summary(list(calls.values()), elapsed)}


def steady_rate(answers: list[tuple[str, float, int]]) -> float | None:
    """Images per second between the first and the last pipeline call to be answered in
    full, from (call, when answered, images) per request (a call answered when its last
    request is): the images of every call after the first over that span. A closed loop
    measured whole also counts the start, when nothing can be answered before a first call
    runs, and the end, when the last answers are made and sent; these do not recur in
    sustained serving. None for fewer than two calls."""
    ends: dict[str, list] = {}
    for call, when, made in answers:
        end = ends.setdefault(call, [when, 0])
        end[0], end[1] = max(end[0], when), end[1] + made
    ordered = sorted(ends.values())
    if len(ordered) < 2 or ordered[-1][0] <= ordered[0][0]:
        return None
    return sum(made for _, made in ordered[1:]) / (ordered[-1][0] - ordered[0][0])


def calls_summary(calls: list[tuple[str, int, float]], elapsed_s: float) -> dict:
    """What the pipeline calls (replica, images, seconds) behind a run's answers say about
    where its time went: the share of the run the replicas spent in calls (their mean;
    below 1, a device waited for work), the images made per second of calls (the engine's
    own speed inside the server), and the mean call time by images per call."""
    if not calls:
        return {}
    busy_s = sum(seconds for _, _, seconds in calls)
    by_size: dict[int, list[float]] = {}
    for _, size, seconds in calls:
        by_size.setdefault(size, []).append(seconds)
    return {"calls": len(calls), "call_images": sum(size for _, size, _ in calls),
            "busy_share": busy_s / (elapsed_s * len({replica for replica, _, _ in calls})),
            "images_per_call_s": sum(size for _, size, _ in calls) / busy_s,
            "mean_call_s_by_images": {str(n): statistics.fmean(v)
                                      for n, v in sorted(by_size.items())}}


def machine() -> dict:
    import importlib.metadata as md

    info = {"platform": platform.platform(), "cpus": os.cpu_count(),
            "versions": {p: md.version(p) for p in ("ray", "diffusers", "torch")}}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def main() -> None:
    args = _parse_args()
    url, startup_s = start_atelier(args.port, _app_args(args))
    one = asyncio.run(single(url, args))
    loops = [asyncio.run(closed_loop(url, args, c)) for c in args.concurrency]
    host = machine()
    report = {"settings": vars(args), "machine": host, "startup_to_healthy_s": startup_s,
              "single": one, "closed_loop": loops}
    print(f"start-up to healthy: {startup_s:.1f}s   machine: {host}")
    print(f"one request ({args.size}x{args.size}, {args.steps} steps): "
          f"p50 {one['p50_s'] * 1000:.0f} ms, p95 {one['p95_s'] * 1000:.0f} ms, "
          f"first {one['first_s'] * 1000:.0f} ms")
    print("concurrency  images/s  p50_s   p95_s   p99_s   mean_batch")
    for r in loops:
        print(f"{r['concurrency']:>11}  {r['images_per_s']:>8.2f}  {r['p50_s']:>6.2f}  "
              f"{r['p95_s']:>6.2f}  {r['p99_s']:>6.2f}  {r['mean_batch_size']:>10.2f}")
    save_report(report, args.out, f"serving-{'gpu' if 'gpu' in host else 'cpu'}")


if __name__ == "__main__":
    main()
