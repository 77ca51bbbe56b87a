"""Open-loop load against a running Atelier: requests arrive on schedule, whatever the
server's speed, as real users do; then a report of what it delivered and what it costs.

    python -m load.run --profile smoke --rates 2 4 8 --requests 40       # vs `make serve`
    python -m load.run --profile mlperf --url http://gpu-box:8000 --rates 0.5 1 2 \\
        --requests 200 --gpu-hour-usd 2.50 --gpus 2 --api-price-usd 0.0035

Arrivals are Poisson (exponential gaps) or bursty (groups of `--burst` requests at once,
groups spaced to keep the same mean rate). Each offered rate sends `--requests` requests
and stops sending at `--max-seconds`; requests still running a grace period later are cut
and counted. Prints a table; writes JSON and a PNG plot of latency against offered load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time

import httpx

from load.analysis import Outcome, cost, plot, summarize
from load.profiles import PROFILES, Profile, sized
from load.report import save_report

_KIND_BY_STATUS = {400: "validation", 401: "unauthorized", 404: "not_found",
                   413: "too_large", 422: "validation", 429: "overload", 503: "overload",
                   504: "timeout"}


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("ATELIER_API_KEY"))
    p.add_argument("--model", help="model id (default: the server's first model)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="smoke")
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                   help="offered loads to run, in requests/s")
    p.add_argument("--arrival", choices=("poisson", "bursty"), default="poisson")
    p.add_argument("--burst", type=int, default=8, help="requests per burst (bursty)")
    p.add_argument("--requests", type=int, default=40, help="requests per offered rate")
    p.add_argument("--max-seconds", type=float, default=300, help="hard cap per rate")
    p.add_argument("--adapters", nargs="+", metavar="NAME_OR_URL",
                   help="the adapters the mixed-adapters profile draws from: catalog names "
                        "or LoRA file URLs (which the server downloads); default: the "
                        "target model's catalog")
    p.add_argument("--size", type=int, help="override the profile's width and height")
    p.add_argument("--steps", type=int, help="override the profile's steps")
    p.add_argument("--slo-s", type=float, help="latency objective (default: the profile's)")
    p.add_argument("--gpu-hour-usd", type=float, default=2.0, help="price of one GPU-hour")
    p.add_argument("--gpus", type=int, help=(
        "GPUs behind the URL (default: those the server's GET /v1/hardware lists, else 1)"))
    p.add_argument("--api-price-usd", type=float, default=0.0035,
                   help="a hosted API's price per image, for the break-even")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default results/load-<profile>.json)")
    p.add_argument("--plot", help="PNG path (default: the JSON path with .png)")
    return p.parse_args(argv)


def arrivals(rng: random.Random, rate: float, n: int, mode: str, burst: int) -> list[float]:
    """Send times (s from the start) of n requests at a mean of `rate` per second."""
    times, now = [], 0.0
    while len(times) < n:
        group = burst if mode == "bursty" else 1
        now += rng.expovariate(rate / group)
        times.extend([now] * min(group, n - len(times)))
    return times


async def _one(client: httpx.AsyncClient, body: dict, sent_s: float) -> Outcome:
    started = time.monotonic()
    try:
        r = await client.post("/generate", json=body)
    except httpx.TimeoutException:
        return Outcome(sent_s, time.monotonic() - started, 0, 0, "timeout")
    except httpx.TransportError:
        return Outcome(sent_s, time.monotonic() - started, 0, 0, "connection")
    latency = time.monotonic() - started
    if r.status_code == 200:
        return Outcome(sent_s, latency, 200, len(r.json()["images"]))
    kind = _KIND_BY_STATUS.get(r.status_code, "failed")
    return Outcome(sent_s, latency, r.status_code, 0, kind)


async def run_level(client: httpx.AsyncClient, profile: Profile, rate: float,
                    args: argparse.Namespace, adapters: list[str]) -> list[Outcome]:
    """Send one offered rate's requests on schedule; return every request's outcome."""
    rng = random.Random(f"{args.seed}-{rate}")
    schedule = [t for t in arrivals(rng, rate, args.requests, args.arrival, args.burst)
                if t <= args.max_seconds]
    start, sent = time.monotonic(), []
    for i, at in enumerate(schedule):
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        body = sized(profile.body(rng, i, adapters), args.size, args.steps)
        if args.model:
            body["model"] = args.model
        sent_s = time.monotonic() - start
        sent.append((sent_s, asyncio.create_task(_one(client, body, sent_s))))
    grace = max(0.0, start + args.max_seconds - time.monotonic()) + 2 * _slo(profile, args)
    if sent:
        await asyncio.wait([task for _, task in sent], timeout=grace)
    cut_at = time.monotonic() - start
    outcomes = []
    for sent_s, task in sent:
        if task.done():
            outcomes.append(task.result())
        else:
            task.cancel()
            outcomes.append(Outcome(sent_s, cut_at - sent_s, 0, 0, "cut_at_time_cap"))
    return outcomes


def _slo(profile: Profile, args: argparse.Namespace) -> float:
    return args.slo_s if args.slo_s is not None else profile.slo_s


async def _adapters(client: httpx.AsyncClient, model: str | None) -> list[str]:
    """The adapters the target model can use (the server's first model by default)."""
    if model is None:
        r = await client.get("/v1/models")
        model = r.json()["data"][0]["id"] if r.status_code == 200 else None
    r = await client.get("/v1/loras", params={"model": model} if model else {})
    return [row["name"] for row in r.json()["data"]] if r.status_code == 200 else []


async def _hardware(client: httpx.AsyncClient) -> list[dict]:
    """What the server's cluster has (GET /v1/hardware: CPUs, GPUs by type), or [] from a
    server that does not say."""
    r = await client.get("/v1/hardware")
    return r.json() if r.status_code == 200 else []


def gpu_count(hardware: list[dict], given: int | None) -> int:
    """The GPUs to price: those `given`, else those the hardware lists, else one."""
    listed = sum(entry["count"] for entry in hardware if entry.get("sku") != "cpu")
    return given or listed or 1


async def main_async(args: argparse.Namespace) -> dict:
    profile = PROFILES[args.profile]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                                 timeout=args.max_seconds + 60) as client:
        adapters = args.adapters or await _adapters(client, args.model)
        hardware = await _hardware(client)
        levels = []
        for rate in args.rates:
            outcomes = await run_level(client, profile, rate, args, adapters)
            levels.append(summarize(outcomes, rate, _slo(profile, args)))
            _print_level(levels[-1])
    return {"profile": profile.name, "description": profile.description, "url": args.url,
            "arrival": args.arrival, "requests_per_rate": args.requests,
            "size": args.size or profile.size, "steps": args.steps or profile.steps,
            "levels": levels, "hardware": hardware,
            "cost": cost(levels, args.gpu_hour_usd, gpu_count(hardware, args.gpus),
                         args.api_price_usd)}


def _print_level(lv: dict) -> None:
    lat = {k: "-" if v is None else f"{v:.2f}" for k, v in lv["latency_s"].items()}
    print(f"offered {lv['offered_rps']:6.2f} req/s | {lv['succeeded']}/{lv['sent']} ok | "
          f"{lv['throughput_img_s']:6.2f} img/s, goodput {lv['goodput_img_s']:6.2f} | "
          f"p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']} s | errors {lv['errors']}")


def _print_cost(c: dict) -> None:
    per_image = c["usd_per_image_at_capacity"]
    print(f"capacity {c['capacity_img_s']:.2f} img/s on {c['gpus']} GPU(s) at "
          f"${c['gpu_hour_usd']}/GPU-hour: "
          + (f"${per_image:.5f} per image" if per_image else "no image within the SLO"))
    if c.get("break_even_img_month") is not None:
        print(f"break-even against ${c['api_price_usd']}/image: "
              f"{c['break_even_img_month']:,.0f} images/month "
              f"(capacity {c['capacity_img_month']:,.0f} images/month)")


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    report = asyncio.run(main_async(args))
    gpus = [f"{h['count']} x {h['name']}" for h in report["hardware"] if h["sku"] != "cpu"]
    if gpus:
        print("the server lists " + ", ".join(gpus))
    _print_cost(report["cost"])
    path = save_report(report, args.out, f"load-{args.profile}")
    png = args.plot or str(path.with_suffix(".png"))
    plot(report["levels"], png, f"Atelier, profile {args.profile} ({args.arrival} arrivals)")
    print(f"saved {png}")


if __name__ == "__main__":
    main()
