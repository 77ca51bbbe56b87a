"""Throughput benchmark: Atelier against the plain FastAPI + diffusers server, in one run.

    python -m load.bench_throughput                            # embedded tiny model, CPU
    python -m load.bench_throughput --random-sdxl ../shared/gpu/sdxl-base-configs.json \\
        --size 1024 --steps 20 --variant compiled --batch 8 --concurrency 8 16 24 \\
        --duration 40 --out results/throughput-h100.json
    python -m load.bench_throughput --random-flux load/flux-dev-configs.json \\
        --size 1024 --steps 28 --variant compiled --batch 4 --concurrency 4 8

1. Builds the model (tiny, or the full SDXL or FLUX architecture with random weights) and
   counts the FLOPs of one image from its configs.
2. Baseline: starts `load.plain_server` (fp16 for SDXL, bf16 for FLUX, SDPA, one request
   at a time), measures one request after another, then `--baseline-concurrency`
   clients, and stops it.
3. Atelier: deploys it with Ray Serve (dtype and speed settings of `--variant`, batching
   of `--batch`/`--wait-ms`), measures the first request after start-up, one request
   after another, then closed loops of each `--concurrency` (each client sends its next
   request when the last returns). At 90 % of the best closed-loop rate it runs the load
   tool's open loop (Poisson arrivals, the mlperf or flux-dev profile's captions) for
   latency percentiles,
   then one request after `--idle-s` of silence, and a restart (deploy again; the compile
   cache stays) timed to healthy and to its first image. The first request and the one
   after the silence are each followed by two more, and all carry the server's split
   (queue, pipeline call, garbage collection in the replica) and the GPU's SM clock
   before sending: what a pause costs, and where. `--keep-warm-s` sets the replicas'
   keep-warm.
Prints a table; writes JSON and (with matplotlib) a PNG next to it. The JSON is first
written, marked `"partial": true`, after the baseline and before each later part, so a run
cut off keeps what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from load import bench_serving as bs
from load.bench_models import GUIDANCE, VARIANTS, add_model_args, model_folder, resolve_family
from load.report import save_report


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="bf16-fast")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, help="default: 8 for SDXL, 3.5 for FLUX")
    p.add_argument("--batch", type=int, default=4, help="Atelier's max_batch_size")
    p.add_argument("--wait-ms", type=float, default=50, help="Atelier's batch window")
    p.add_argument("--single", type=int, default=5, help="sequential requests for latency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--duration", type=float, default=10, help="seconds per closed loop")
    p.add_argument("--baseline-concurrency", type=int, default=4)
    p.add_argument("--open-s", type=float, default=15, help="seconds of open-loop arrivals")
    p.add_argument("--idle-s", type=float, default=5)
    p.add_argument("--keep-warm-s", type=float, help="Atelier's keep_warm_s (default: off)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-restart", action="store_true")
    p.add_argument("--port", type=int, default=8077)
    p.add_argument("--baseline-port", type=int, default=8090)
    p.add_argument("--cache-dir", help="model and compile cache (default: Atelier's)")
    p.add_argument("--out", help="JSON output path")
    args = p.parse_args(argv)
    resolve_family(p, args, [args.variant])
    args.guidance = GUIDANCE[args.family] if args.guidance is None else args.guidance
    return args


def atelier_config(args: argparse.Namespace, folder: Path) -> dict:
    dtype, speed = VARIANTS[args.variant]
    return {"atelier": {"cache_dir": args.cache_dir, "models": [{
        "id": f"bench/{args.family}", "family": args.family, "path": str(folder),
        "dtype": dtype, "speed": speed,
        "num_cpus": min(4, os.cpu_count() or 1),
        "max_ongoing_requests": max(64, args.batch * 4), "max_queued_requests": 1024,
        "request_timeout_s": 600, "health_stall_s": 900, "health_check_timeout_s": 120,
        "keep_warm_s": args.keep_warm_s,
        "batching": {"max_batch_size": args.batch, "wait_ms": args.wait_ms},
        "limits": {"max_size": 2048, "max_pixels": 2048 * 2048, "max_steps": 100,
                   "max_request_pixels": 64 * 2048 * 2048},
        "defaults": {"width": args.size, "height": args.size,
                     "num_inference_steps": args.steps, "guidance_scale": args.guidance}}]}}


def _wait_healthy(url: str, path: str, proc: subprocess.Popen | None = None,
                  limit_s: float = 900) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=10).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url}{path} not healthy after {limit_s}s")


def baseline(args: argparse.Namespace, folder: Path) -> dict:
    url = f"http://127.0.0.1:{args.baseline_port}"
    dtype = "bfloat16" if args.family == "flux" else "float16"
    proc = subprocess.Popen([sys.executable, "-m", "load.plain_server", "--model", str(folder),
                             "--dtype", dtype, "--port", str(args.baseline_port)])
    try:
        startup_s = _wait_healthy(url, "/health", proc)
        one = asyncio.run(bs.single(url, args))
        loop = asyncio.run(bs.closed_loop(url, args, args.baseline_concurrency))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"startup_to_healthy_s": startup_s, "single": one, "closed_loop": [loop]}


async def _open_loop(url: str, args: argparse.Namespace, rate: float) -> dict:
    from load.analysis import summarize
    from load.profiles import PROFILES
    from load.run import run_level

    profile = PROFILES["flux-dev" if args.family == "flux" else "mlperf"]
    opts = argparse.Namespace(seed=0, requests=max(8, round(rate * args.open_s)),
                              arrival="poisson", burst=1, max_seconds=args.open_s * 3,
                              size=args.size, steps=args.steps, model=None, slo_s=None)
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        outcomes = await run_level(client, profile, rate, opts, [])
    return summarize(outcomes, rate, profile.slo_s)


def _timed_request(url: str, args: argparse.Namespace, seed: int) -> dict:
    """One request: its time at the client, and how the server split it (queue,
    pipeline call, garbage collection in the model replica meanwhile), with the GPU's SM
    clock just before it was sent (where readable), to tell a cold device from a cold
    HTTP path."""
    clock = _sm_clock_mhz()
    started = time.monotonic()
    r = httpx.post(url + "/generate", json=bs._body(args, seed), timeout=900)
    r.raise_for_status()
    return {"request_s": time.monotonic() - started,
            "queue_ms": float(r.headers["X-Atelier-Queue-Ms"]),
            "inference_ms": float(r.headers["X-Atelier-Inference-Ms"]),
            "gc_ms": float(r.headers["X-Atelier-GC-Ms"]),
            "sm_clock_mhz_before": clock}


def _cold_then_warm(url: str, args: argparse.Namespace, seed: int) -> dict:
    """A request after a pause, then two straight after it: what the pause cost."""
    cold = _timed_request(url, args, seed)
    warm = [_timed_request(url, args, seed + 1 + i) for i in range(2)]
    return {"request_s": cold["request_s"], "cold": cold, "warm_after": warm}


def _sm_clock_mhz() -> float | None:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    query = ["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits", "-i", gpu]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True)
        return float(done.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def atelier(args: argparse.Namespace, folder: Path, out: dict,
            checkpoint: Callable[[], object]) -> None:
    """Measure Atelier into `out`, calling `checkpoint()` between its parts."""
    from ray import serve

    url, startup_s = bs.start_atelier(args.port, atelier_config(args, folder))
    first = _cold_then_warm(url, args, 1)
    out.update(startup_to_healthy_s=startup_s, first_request_s=first["request_s"],
               first_request=first)
    out["single"] = asyncio.run(bs.single(url, args))
    out["closed_loop"] = []
    for c in args.concurrency:
        checkpoint()
        out["closed_loop"].append(asyncio.run(bs.closed_loop(url, args, c)))
    checkpoint()
    best = max(r["images_per_s"] for r in out["closed_loop"])
    out["open_loop_90pct"] = asyncio.run(_open_loop(url, args, 0.9 * best))
    checkpoint()
    time.sleep(args.idle_s)
    out["after_idle_s"] = {"idle_s": args.idle_s, **_cold_then_warm(url, args, 10)}
    if not args.no_restart:
        checkpoint()
        serve.delete("atelier")
        _, again = bs.start_atelier(args.port, atelier_config(args, folder))
        out["restart"] = {"to_healthy_s": again,
                          "first_request_s": _timed_request(url, args, 20)["request_s"]}
    serve.shutdown()


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    from load.flops import image_flops
    from serve.config import default_cache_dir

    args.cache_dir = args.cache_dir or str(default_cache_dir())
    folder = model_folder(args.configs, Path(args.cache_dir), args.family)
    flops = image_flops(args.family, folder, args.size, args.steps,
                        VARIANTS[args.variant][1].get("cfg_cutoff"))
    report: dict = {"settings": vars(args), "machine": bs.machine(), "flops": flops,
                    "variant": dict(zip(("dtype", "speed"), VARIANTS[args.variant]))}
    name = f"throughput-{'gpu' if 'gpu' in report['machine'] else 'cpu'}"

    def checkpoint() -> None:
        save_report(report, args.out, name, partial=True)

    if not args.no_baseline:
        report["baseline"] = baseline(args, folder)
        _print("plain server", report["baseline"], flops)
        checkpoint()
    report["atelier"] = {}
    atelier(args, folder, report["atelier"], checkpoint)
    _print(f"atelier {args.variant}", report["atelier"], flops)
    _summarize(report, flops)
    path = save_report(report, args.out, name)
    plot(report, path.with_suffix(".png"))
    return report


def _summarize(report: dict, flops: dict) -> None:
    a = report["atelier"]
    top = max(a["closed_loop"], key=lambda r: r["images_per_s"])
    best = top["images_per_s"]
    s = {"atelier_images_per_s": best, "atelier_tflops": best * flops["image"] / 1e12,
         # Below the engine's own figure: an idle device (busy share) or slower calls.
         "busy_share_at_best": top.get("busy_share"),
         "images_per_call_s_at_best": top.get("images_per_call_s"),
         "first_request_vs_steady": a["first_request_s"] / a["single"]["p50_s"],
         "after_idle_vs_steady": a["after_idle_s"]["request_s"] / a["single"]["p50_s"],
         "p99_at_90pct_s": a["open_loop_90pct"]["latency_s"]["p99"]}
    # Between the first and last calls answered (`steady_rate`): sustained serving, without
    # the run's start and end.
    s["atelier_steady_images_per_s"] = top.get("steady_images_per_s")
    if "baseline" in report:
        loop = report["baseline"]["closed_loop"][0]
        base, steady = loop["images_per_s"], loop.get("steady_images_per_s")
        s.update(baseline_images_per_s=base, speedup=best / base,
                 baseline_steady_images_per_s=steady)
        if steady and s["atelier_steady_images_per_s"]:
            s["steady_speedup"] = s["atelier_steady_images_per_s"] / steady
    report["summary"] = s
    print("summary: " + ", ".join(f"{k} {v:.3g}" for k, v in s.items() if v is not None))


def _print(name: str, r: dict, flops: dict) -> None:
    one = r["single"]
    print(f"{name}: healthy after {r['startup_to_healthy_s']:.1f}s; one request p50 "
          f"{one['p50_s']:.3f}s", flush=True)
    print("  concurrency  images/s  steady  TFLOP/s  p50_s   p99_s   mean_batch  busy  "
          "img/s_in_calls")
    for c in r["closed_loop"]:
        busy = (f"  {c['busy_share']:>4.2f}  {c['images_per_call_s']:>14.3f}"
                if "busy_share" in c else "")
        steady = c.get("steady_images_per_s")
        print(f"  {c['concurrency']:>11}  {c['images_per_s']:>8.3f}  "
              f"{'-' if steady is None else f'{steady:.3f}':>6}  "
              f"{c['images_per_s'] * flops['image'] / 1e12:>7.1f}  {c['p50_s']:>6.2f}  "
              f"{c['p99_s']:>6.2f}  {c['mean_batch_size']:>10.2f}{busy}", flush=True)


def plot(report: dict, path: Path) -> None:
    """Images/s and p99 latency against concurrency, Atelier beside the plain server."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("baseline", "atelier"):
        if name in report:
            loops = report[name]["closed_loop"]
            xs = [c["concurrency"] for c in loops]
            left.plot(xs, [c["images_per_s"] for c in loops], "o-", label=name)
            right.plot(xs, [c["p99_s"] for c in loops], "o-", label=name)
    s = report["settings"]
    left.set(xlabel="concurrent clients", ylabel="images/s",
             title=f"{s['size']}², {s['steps']} steps, {report['machine'].get('gpu', 'CPU')}")
    right.set(xlabel="concurrent clients", ylabel="p99 latency (s)")
    left.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
