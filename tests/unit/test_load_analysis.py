"""The load tool's arithmetic: arrival schedules, percentiles, summaries, cost."""

import random
import statistics

import pytest

from load.analysis import HOURS_PER_MONTH, Outcome, cost, percentile, summarize
from load.run import arrivals


def test_poisson_arrivals_keep_the_mean_rate_and_vary():
    times = arrivals(random.Random(1), rate=4.0, n=4000, mode="poisson", burst=8)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.1)  # exponential: sd = mean


def test_bursty_arrivals_come_in_groups_at_the_same_mean_rate():
    times = arrivals(random.Random(2), rate=4.0, n=4000, mode="bursty", burst=8)
    groups = [times[i:i + 8] for i in range(0, len(times), 8)]
    assert all(len(set(g)) == 1 for g in groups)
    assert len(times) / times[-1] == pytest.approx(4.0, rel=0.1)


def test_percentiles_interpolate():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)
    assert percentile([], 50) is None


def test_summary_separates_goodput_throughput_and_errors():
    outcomes = [Outcome(0.0, 1.0, 200, 2), Outcome(1.0, 3.0, 200, 1),
                Outcome(2.0, 0.5, 503, 0, "overload"), Outcome(3.0, 1.0, 0, 0, "timeout")]
    s = summarize(outcomes, offered_rps=1.0, slo_s=2.0)
    assert s["span_s"] == 4.0  # first send at 0, last answer at 4
    assert s["throughput_img_s"] == 3 / 4 and s["goodput_img_s"] == 2 / 4
    assert s["succeeded"] == 2 and s["within_slo"] == 1
    assert s["errors"] == {"overload": 1, "timeout": 1}
    assert s["latency_s"]["p50"] == 2.0


def test_cost_uses_the_best_goodput_and_the_break_even_volume():
    levels = [{"goodput_img_s": 0.5}, {"goodput_img_s": 2.0}, {"goodput_img_s": 1.0}]
    c = cost(levels, gpu_hour_usd=3.6, gpus=2, api_price_usd=0.004)
    assert c["capacity_img_s"] == 2.0
    assert c["usd_per_image_at_capacity"] == pytest.approx(7.2 / 3600 / 2.0)
    assert c["fixed_usd_per_month"] == pytest.approx(7.2 * HOURS_PER_MONTH)
    assert c["break_even_img_month"] == pytest.approx(7.2 * HOURS_PER_MONTH / 0.004)


def test_calls_summary_splits_a_run_into_busy_time_and_speed_in_calls():
    from load.bench_serving import calls_summary

    # Two replicas over a 10 s run: one spent 8 s in calls, the other 4 s.
    calls = [("r1", 8, 5.0), ("r1", 4, 3.0), ("r2", 8, 4.0)]
    s = calls_summary(calls, 10.0)
    assert s["calls"] == 3 and s["call_images"] == 20
    assert s["busy_share"] == pytest.approx(12.0 / 20.0)
    assert s["images_per_call_s"] == pytest.approx(20 / 12.0)
    assert s["mean_call_s_by_images"] == {"4": 3.0, "8": 4.5}
    assert calls_summary([], 10.0) == {}


def test_steady_rate_counts_the_calls_after_the_first_over_the_span_they_were_answered_in():
    from load.bench_serving import steady_rate

    # Calls of 4, 4 and 2 images answered at 5, 9 and 13 s (each over a spread of its own
    # requests' answers): 6 images in the 8 s from the first call's end to the last's.
    answers = [("b-1", 4.8, 2), ("b-1", 5.0, 2), ("b-2", 9.0, 1), ("b-2", 8.7, 3),
               ("b-3", 13.0, 2)]
    assert steady_rate(answers) == pytest.approx(6 / 8.0)
    # The order requests come back in does not matter; one call alone gives no span.
    assert steady_rate(list(reversed(answers))) == pytest.approx(6 / 8.0)
    assert steady_rate([("b-1", 4.8, 2), ("b-1", 5.0, 2)]) is None
    assert steady_rate([]) is None


def test_the_gpus_priced_are_those_given_else_those_the_server_lists_else_one():
    from load.run import gpu_count

    listed = [{"sku": "cpu", "name": "CPU", "count": 128, "servers": 2},
              {"sku": "gpu-rtx-pro-6000", "name": "RTX PRO 6000 GPU", "count": 4, "servers": 2},
              {"sku": "gpu-l40s", "name": "L40S GPU", "count": 2, "servers": 1}]
    assert gpu_count(listed, None) == 6
    assert gpu_count(listed, 2) == 2
    assert gpu_count(listed[:1], None) == 1  # CPUs only
    assert gpu_count([], None) == 1  # a server that does not list its hardware
