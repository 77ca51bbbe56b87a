"""The serving benchmarks end to end on the tiny models (`load.bench_throughput`,
`load.bench_serving`, `load.bench_status`): the same commands that measure a GPU, with
small sizes. They run Ray themselves, so they run before tests/integration starts its
cluster (pytest collects folders in name order)."""

import json

import pytest

from tests.commands.programs import run_program, watch_program
from tests.conftest import free_port


@pytest.fixture(scope="module")
def throughput(tmp_path_factory, tiny_sdxl_path):
    out = tmp_path_factory.mktemp("bench") / "throughput.json"
    stdout, seen = watch_program(out, "load.bench_throughput", "--variant", "bf16-fast", "--batch",
                                 "4", "--concurrency", "1", "6", "--duration", "6", "--single",
                                 "3", "--open-s", "5", "--idle-s", "1", "--keep-warm-s", "0.5",
                                 "--port", str(free_port()), "--baseline-port", str(free_port()))
    return json.loads(out.read_text()), stdout, out, seen


def test_throughput_benchmark_measures_the_plain_server_and_atelier(throughput):
    report, stdout, _, _ = throughput
    base, atelier = report["baseline"], report["atelier"]
    # The plain server answers one request at a time; Atelier batches concurrent clients.
    assert base["closed_loop"][0]["mean_batch_size"] == 1
    assert base["closed_loop"][0]["images"] > 0
    loops = {c["concurrency"]: c for c in atelier["closed_loop"]}
    assert loops[1]["mean_batch_size"] == 1
    assert loops[6]["mean_batch_size"] > 1.5
    assert all(c["images"] > 0 and c["p50_s"] <= c["p99_s"] for c in loops.values())
    # The pipeline calls named in the answers hold every image, and took part of the run.
    for c in loops.values():
        assert c["call_images"] == c["images"] and c["calls"] <= c["images"]
        assert 0 < c["busy_share"] <= 1
        assert c["images_per_call_s"] == pytest.approx(c["images_per_s"] / c["busy_share"])
    # Between the first and the last call answered, at least as fast as the whole run.
    assert loops[6]["steady_images_per_s"] >= loops[6]["images_per_s"] * 0.9
    assert list(loops[1]["mean_call_s_by_images"]) == ["1"]
    assert "busy_share" not in base["closed_loop"][0]  # the plain server names no calls
    best = max(c["images_per_s"] for c in loops.values())
    summary = report["summary"]
    assert summary["atelier_images_per_s"] == best
    top = max(loops.values(), key=lambda c: c["images_per_s"])
    assert (summary["busy_share_at_best"], summary["images_per_call_s_at_best"]) == (
        top["busy_share"], top["images_per_call_s"])
    assert summary["speedup"] == pytest.approx(best / base["closed_loop"][0]["images_per_s"])
    assert summary["atelier_steady_images_per_s"] == top["steady_images_per_s"]
    assert summary["steady_speedup"] == pytest.approx(
        top["steady_images_per_s"] / base["closed_loop"][0]["steady_images_per_s"])
    assert summary["atelier_tflops"] == pytest.approx(best * report["flops"]["image"] / 1e12)
    assert "speedup" in stdout and "plain server" in stdout


def test_throughput_benchmark_runs_the_open_loop_the_idle_request_and_a_restart(throughput):
    report, _, _, _ = throughput
    a = report["atelier"]
    open_loop = a["open_loop_90pct"]
    best = report["summary"]["atelier_images_per_s"]
    assert open_loop["offered_rps"] == pytest.approx(0.9 * best)
    assert open_loop["errors"] == {}  # first: a failure shows which kinds of error
    assert open_loop["sent"] >= 8 and open_loop["succeeded"] == open_loop["sent"]
    assert open_loop["latency_s"]["p99"] == report["summary"]["p99_at_90pct_s"]
    assert a["after_idle_s"]["idle_s"] == 1 and a["after_idle_s"]["request_s"] > 0
    # The first request and the one after the pause, each with the two that followed it,
    # split by the server into queue, pipeline and collection time (no GPU clock on a
    # CPU machine).
    for cold_then_warm in (a["first_request"], a["after_idle_s"]):
        cold, warm = cold_then_warm["cold"], cold_then_warm["warm_after"]
        assert cold["request_s"] == cold_then_warm["request_s"] and len(warm) == 2
        for r in (cold, *warm):
            assert 0 < r["inference_ms"] / 1000 < r["request_s"] and r["queue_ms"] >= 0
            assert 0 <= r["gc_ms"] / 1000 < r["request_s"]
            assert r["sm_clock_mhz_before"] is None
    assert report["settings"]["keep_warm_s"] == 0.5
    assert a["restart"]["to_healthy_s"] > 0 and a["restart"]["first_request_s"] > 0
    assert report["variant"] == {"dtype": "bfloat16",
                                 "speed": {"channels_last": True, "fuse_qkv": True}}


def test_throughput_benchmark_saves_each_part_as_it_is_measured(throughput):
    """A run cut off (a device call's time limit) leaves what it had measured: the report
    is rewritten, marked partial, before each closed loop, the open loop and the restart."""
    report, _, _, seen = throughput
    partial, final = seen[:-1], seen[-1]
    assert final == report and "partial" not in final
    assert partial and all(s["partial"] is True for s in partial)
    loops = [len(s.get("atelier", {}).get("closed_loop", [])) for s in partial]
    assert loops == sorted(loops) and {0, 1, 2} <= set(loops)
    # The plain server's figures come first, before Atelier is even started.
    assert partial[0]["baseline"] == report["baseline"] and "atelier" not in partial[0]
    last = partial[-1]["atelier"]
    assert "after_idle_s" in last and "restart" not in last and "summary" not in partial[-1]
    assert last["closed_loop"] == report["atelier"]["closed_loop"]


def test_throughput_benchmark_plots_next_to_its_json(throughput):
    _, _, out, _ = throughput
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_throughput_benchmark_serves_flux_against_a_plain_flux_server(tmp_path,
                                                                       tiny_flux_path):
    """The same run on the tiny FLUX: the plain server loads the folder's FluxPipeline, the
    open loop sends the flux-dev profile (FLUX takes its scheduler and guidance), and the
    TFLOP/s follow FLUX's FLOP count."""
    out = tmp_path / "flux.json"
    stdout = run_program("load.bench_throughput", "--family", "flux", "--variant", "bf16-fast",
                         "--batch", "4", "--concurrency", "4", "--duration", "5", "--single", "2",
                         "--open-s", "4", "--idle-s", "0.5", "--no-restart",
                         "--port", str(free_port()), "--baseline-port", str(free_port()),
                         "--out", str(out))
    report = json.loads(out.read_text())
    assert report["settings"]["family"] == "flux" and report["settings"]["guidance"] == 3.5
    assert report["flops"]["image"] == 2 * report["flops"]["transformer_forward"] + report[
        "flops"]["vae_decode"]
    base, (loop,) = report["baseline"]["closed_loop"][0], report["atelier"]["closed_loop"]
    assert base["images"] > 0 and base["mean_batch_size"] == 1
    assert loop["images"] == loop["call_images"] > 0 and loop["mean_batch_size"] > 1
    open_loop = report["atelier"]["open_loop_90pct"]
    assert open_loop["errors"] == {}  # first: a failure shows which kinds of error
    assert open_loop["sent"] >= 8 and open_loop["succeeded"] == open_loop["sent"]
    summary = report["summary"]
    assert summary["speedup"] == pytest.approx(loop["images_per_s"] / base["images_per_s"])
    assert summary["atelier_tflops"] == pytest.approx(
        loop["images_per_s"] * report["flops"]["image"] / 1e12)
    assert "restart" not in report["atelier"] and "atelier bf16-fast" in stdout


def test_serving_benchmark_clients_of_two_guidance_scales_and_three_prompt_lengths_share_calls(
        tmp_path):
    """Six clients, each with its own pair of a guidance scale (of two) and a prompt of one,
    two or three chunks, and calls of up to 4 images: with the scales kept apart a call
    could hold 3 at the most, with the prompt lengths apart 2, with both apart 1."""
    out = tmp_path / "serving.json"
    run_program("load.bench_serving", "--single", "2", "--concurrency", "6", "--duration", "8",
                "--guidance-mix", "5", "9", "--prompt-chunks", "3",
                "--prompt-words", "0", "100", "200", "--port", str(free_port()),
                "--out", str(out))
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert (settings["guidance_mix"], settings["prompt_words"]) == ([5, 9], [0, 100, 200])
    (loop,) = report["closed_loop"]
    assert loop["concurrency"] == 6 and loop["call_images"] == loop["images"] > 0
    assert loop["mean_batch_size"] > 2.5
    assert max(int(n) for n in loop["mean_call_s_by_images"]) == 4


def test_status_benchmark_times_the_ingress_read_beside_serve_status(tmp_path, cache_dir):
    out = tmp_path / "status.json"
    stdout = run_program("load.bench_status", "--models", "2", "--reads", "3", "--cache-dir",
                         str(cache_dir), "--out", str(out))
    report = json.loads(out.read_text())
    # Two models and the ingress, one replica each; the ingress's read gave each the same
    # status, message and running replicas as serve.status() (it stops with an error
    # otherwise).
    [row] = report["rows"]
    assert (row["models"], row["deployments"], report["reads"]) == (2, 3, 3)
    for way in ("ingress_read", "serve_status"):
        assert row[way]["wall_ms"] > 0 and row[way]["cpu_ms"] >= 0, row
    assert "models  deployments  ingress read" in stdout
    assert stdout.splitlines()[-2].split()[:2] == ["2", "3"]
