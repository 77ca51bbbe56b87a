"""What a load run delivered and what it costs: summaries per offered rate, cost, plot."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

HOURS_PER_MONTH = 730


@dataclass(frozen=True)
class Outcome:
    """One request: when it was sent (s from the level's start), how long it took, and
    either its images or the kind of error it met."""

    sent_s: float
    latency_s: float
    status: int  # 0 when no HTTP answer came
    images: int
    kind: str | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(outcomes: Sequence[Outcome], offered_rps: float, slo_s: float) -> dict:
    """Throughput, latency percentiles, goodput under `slo_s`, errors by kind.

    Rates are over the level's span: from its first send to its last answer.
    """
    ok = [o for o in outcomes if o.kind is None]
    span = max((o.sent_s + o.latency_s for o in outcomes), default=0.0)
    span = max(span - min((o.sent_s for o in outcomes), default=0.0), 1e-9)
    latencies = [o.latency_s for o in ok]
    in_slo = [o for o in ok if o.latency_s <= slo_s]
    return {
        "offered_rps": offered_rps, "sent": len(outcomes), "succeeded": len(ok),
        "span_s": round(span, 3),
        "throughput_img_s": sum(o.images for o in ok) / span,
        "goodput_img_s": sum(o.images for o in in_slo) / span,
        "slo_s": slo_s, "within_slo": len(in_slo),
        "latency_s": {f"p{q}": percentile(latencies, q) for q in (50, 95, 99)},
        "errors": dict(Counter(o.kind for o in outcomes if o.kind is not None)),
    }


def cost(levels: Sequence[dict], gpu_hour_usd: float, gpus: int,
         api_price_usd: float | None) -> dict:
    """Cost per image at the best goodput seen, and the break-even against an API price.

    The servers cost `gpu_hour_usd` per GPU-hour whether busy or not; an API charges
    `api_price_usd` per image. Break-even is the monthly volume above which owning wins.
    """
    best = max(levels, key=lambda lv: lv["goodput_img_s"], default=None)
    rate = best["goodput_img_s"] if best else 0.0
    per_hour = gpu_hour_usd * gpus
    out = {"gpu_hour_usd": gpu_hour_usd, "gpus": gpus, "api_price_usd": api_price_usd,
           "capacity_img_s": rate, "capacity_img_month": rate * 3600 * HOURS_PER_MONTH,
           "usd_per_image_at_capacity": per_hour / 3600 / rate if rate > 0 else None,
           "fixed_usd_per_month": per_hour * HOURS_PER_MONTH}
    if api_price_usd:
        out["break_even_img_month"] = out["fixed_usd_per_month"] / api_price_usd
        out["api_usd_per_month_at_capacity"] = out["capacity_img_month"] * api_price_usd
    return out


def plot(levels: Sequence[dict], path: str, title: str) -> None:
    """Latency percentiles and throughput/goodput against offered load, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    offered = [lv["offered_rps"] for lv in levels]
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for q in ("p50", "p95", "p99"):
        ys = [lv["latency_s"][q] for lv in levels]
        lat.plot(offered, [math.nan if y is None else y for y in ys], marker="o", label=q)
    lat.axhline(levels[0]["slo_s"], color="grey", linestyle="--", label="SLO")
    lat.set(xlabel="offered load (requests/s)", ylabel="latency (s)", title="Latency")
    thr.plot(offered, [lv["throughput_img_s"] for lv in levels], marker="o", label="throughput")
    thr.plot(offered, [lv["goodput_img_s"] for lv in levels], marker="s", label="goodput")
    thr.set(xlabel="offered load (requests/s)", ylabel="images/s", title="Delivered")
    for ax in (lat, thr):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
