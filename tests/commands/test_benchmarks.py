"""The benchmark programs, end to end on the tiny model: the same commands that measure a
GPU, with small sizes. They run Ray themselves, so they run before tests/integration
starts its cluster (pytest collects folders in name order)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def _run(module, *args, timeout=600):
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _watched(out: Path, module: str, *args: str, timeout: float = 600) -> tuple[str, list]:
    """Run a benchmark like `_run`, reading its report file each time it changes."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args, "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and (not seen or json.loads(out.read_text()) != seen[-1]):
            seen.append(json.loads(out.read_text()))
        time.sleep(0.1)
    stdout, stderr = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    assert proc.returncode == 0, stderr[-3000:]
    if json.loads(out.read_text()) != seen[-1]:
        seen.append(json.loads(out.read_text()))
    return stdout, seen


@pytest.fixture(scope="module")
def throughput(tmp_path_factory, tiny_sdxl_path):
    out = tmp_path_factory.mktemp("bench") / "throughput.json"
    stdout, seen = _watched(out, "load.bench_throughput", "--variant", "bf16-fast", "--batch",
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
    stdout = _run("load.bench_throughput", "--family", "flux", "--variant", "bf16-fast",
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


def test_serving_benchmark_clients_of_four_guidance_scales_share_calls(tmp_path):
    """Eight clients, two for each of four scales, and calls of up to 4 images: with each
    scale apart a call could hold 2 at the most."""
    out = tmp_path / "serving.json"
    _run("load.bench_serving", "--single", "2", "--concurrency", "8", "--duration", "8",
         "--guidance-mix", "5", "7.5", "9", "11", "--port", str(free_port()), "--out", str(out))
    report = json.loads(out.read_text())
    assert report["settings"]["guidance_mix"] == [5, 7.5, 9, 11]
    (loop,) = report["closed_loop"]
    assert loop["concurrency"] == 8 and loop["call_images"] == loop["images"] > 0
    assert loop["mean_batch_size"] > 2.5
    assert max(int(n) for n in loop["mean_call_s_by_images"]) == 4


def test_serving_benchmark_clients_of_three_prompt_lengths_share_calls(tmp_path):
    """Six clients, two for each of prompts of one, two and three chunks, and calls of up
    to 4 images: with each count apart a call could hold 2 at the most."""
    out = tmp_path / "serving.json"
    _run("load.bench_serving", "--single", "2", "--concurrency", "6", "--duration", "8",
         "--prompt-chunks", "3", "--prompt-words", "0", "100", "200",
         "--port", str(free_port()), "--out", str(out))
    report = json.loads(out.read_text())
    assert report["settings"]["prompt_words"] == [0, 100, 200]
    (loop,) = report["closed_loop"]
    assert loop["concurrency"] == 6 and loop["call_images"] == loop["images"] > 0
    assert loop["mean_batch_size"] > 2.5
    assert max(int(n) for n in loop["mean_call_s_by_images"]) >= 3


def test_flops_follow_the_model_configs(tiny_sdxl_path):
    from load.flops import guided_steps, sdxl_flops

    small, large = sdxl_flops(tiny_sdxl_path, 64, 2), sdxl_flops(tiny_sdxl_path, 64, 4)
    assert small["unet_step"] == 2 * small["unet_forward"] > 0
    assert large["image"] - small["image"] == 2 * small["unet_step"]
    # Under speed.cfg_cutoff 0.5, 3 of 4 steps are guided (indexes 0-2): one forward fewer.
    cut = sdxl_flops(tiny_sdxl_path, 64, 4, guided_steps(4, 0.5))
    assert guided_steps(4, 0.5) == 3 and large["image"] - cut["image"] == cut["unet_forward"]
    assert sdxl_flops(tiny_sdxl_path, 128, 2)["unet_forward"] > 3 * small["unet_forward"]


def _flux_config_folder(folder, configs):
    """The config files of a FLUX model folder, as save_pretrained writes them (no weights)."""
    for part, name in (("transformer", "config.json"), ("vae", "config.json"),
                       ("tokenizer_2", "tokenizer_config.json")):
        (folder / part).mkdir(parents=True)
        (folder / part / name).write_text(json.dumps(configs[part]))
    return folder


def test_flux_flops_count_every_block_over_the_image_and_text_tokens(tmp_path):
    """FLUX.1-dev at 1024²: 4096 image tokens and 512 T5 tokens. Counted by hand, each of
    the 57 blocks applies 113.2 M weights to each token of its stream (19 double blocks:
    image and text streams with their own weights; 38 single blocks over all 4608 tokens)
    and attention costs 4·L²·3072 per block; the counter finds that plus the embedders."""
    from load.flops import flux_flops

    configs = json.loads((ROOT / "load" / "flux-dev-configs.json").read_text())
    folder = _flux_config_folder(tmp_path, configs)
    width, mlp = 3072, 4 * 3072
    double = 4 * width * width + 2 * width * mlp  # q, k, v, out; feed-forward in and out
    single = width * (3 * width + mlp) + (width + mlp) * width  # fused linear1, linear2
    tokens = 4096 + 512
    blocks = 2 * tokens * (19 * double + 38 * single) + 57 * 4 * tokens**2 * width
    big, small = flux_flops(folder, 1024, 28), flux_flops(folder, 512, 28)
    assert (big["image_tokens"], big["text_tokens"]) == (4096, 512)
    assert blocks < big["transformer_forward"] < 1.01 * blocks
    assert big["image"] == 28 * big["transformer_forward"] + big["vae_decode"]
    assert small["image_tokens"] == 1024 and small["transformer_forward"] < big[
        "transformer_forward"] / 3


def test_engine_benchmark_runs_flux(tmp_path, tiny_flux_path):
    out = tmp_path / "engine.json"
    stdout = _run("load.bench_engine", "--family", "flux", "--variants", "bf16", "bf16",
                  "fp8", "--batches", "1", "2", "--steps", "2", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["flops"]["text_tokens"] == 256 and report["flops"]["image_tokens"] == 16
    assert report["flops"]["image"] == 2 * report["flops"]["transformer_forward"] + report[
        "flops"]["vae_decode"]
    first, again, fp8 = report["variants"]
    assert first["mean_abs_diff_vs_first"] == again["mean_abs_diff_vs_first"] == 0
    assert fp8["mean_abs_diff_vs_first"] > 0 and fp8["speed"]["fp8"] is True
    for v in report["variants"]:
        assert set(v["stages_s"]) == {"encode", "denoise", "vae_decode", "to_pil"}
        for b in v["batches"]:
            assert b["tflops"] == pytest.approx(b["images_per_s"] * report["flops"]["image"]
                                                / 1e12)
        # A loaded engine is hundreds of thousands of objects; settled, a full collection
        # scans none of them.
        gc = v["gc"]
        assert gc["frozen"] > 100_000 and gc["objects"] > 100_000
        assert gc["full_collection_settled_s"] < gc["full_collection_s"]
    assert "stages:" in stdout and "full garbage collection of" in stdout
    done = subprocess.run([sys.executable, "-m", "load.bench_engine", "--family", "flux",
                           "--variants", "compiled-cfg50"], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 2 and "no classifier-free guidance" in done.stderr


def test_engine_benchmark_compares_variants_with_the_first(tmp_path):
    out = tmp_path / "engine.json"
    stdout = _run("load.bench_engine", "--variants", "fp16", "fp16", "fp8", "--batches", "1",
                  "2", "--out", str(out))
    report = json.loads(out.read_text())
    first, again, fp8 = report["variants"]
    assert "partial" not in report
    assert first["mean_abs_diff_vs_first"] == again["mean_abs_diff_vs_first"] == 0
    assert fp8["mean_abs_diff_vs_first"] > 0  # FP8 computes a slightly different image
    for v in report["variants"]:
        assert [b["images"] for b in v["batches"]] == [1, 2]
        assert set(v["stages_s"]) == {"encode", "denoise", "vae_decode", "to_pil"}
        for b in v["batches"]:
            assert b["tflops"] == pytest.approx(b["images_per_s"] * report["flops"]["image"]
                                                / 1e12)
        # A loaded engine is hundreds of thousands of objects; settled, a full collection
        # scans none of them.
        gc = v["gc"]
        assert gc["frozen"] > 100_000 and gc["objects"] > 100_000
        assert gc["full_collection_settled_s"] < gc["full_collection_s"]
    assert "stages:" in stdout and "full garbage collection of" in stdout


def test_an_unguided_engine_benchmark_counts_one_unet_forward_per_step(tmp_path, cache_dir):
    """As few-step models run (guidance 0): the report's FLOPs per image are those of one
    UNet forward per step, not guidance's two."""
    from deployments.tiny import TINY_SDXL, ensure_embedded
    from load.flops import sdxl_flops

    out = tmp_path / "engine.json"
    _run("load.bench_engine", "--variants", "fp16", "--guidance", "0", "--steps", "4",
         "--batches", "2", "--repeats", "1", "--out", str(out))
    report = json.loads(out.read_text())
    folder = ensure_embedded(TINY_SDXL, cache_dir)
    unguided, guided = (sdxl_flops(folder, 64, 4, n)["image"] for n in (0, 4))
    assert report["settings"]["guidance"] == 0
    assert report["flops"]["image"] == report["variants"][0]["flops_per_image"] == unguided
    assert unguided < 0.6 * guided


def test_an_engine_benchmark_cut_off_leaves_the_variants_it_measured(tmp_path):
    """As a device call's time limit does: the run is killed during its second variant."""
    out = tmp_path / "engine.json"
    proc = subprocess.Popen([sys.executable, "-m", "load.bench_engine", "--variants", "fp16",
                             "fp8", "--batches", "1", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    report = json.loads(out.read_text())
    assert report["partial"] is True
    (first,) = report["variants"]
    assert first["variant"] == "fp16" and first["mean_abs_diff_vs_first"] == 0
    assert [b["images"] for b in first["batches"]] == [1] and first["batches"][0]["tflops"] > 0
    assert not (tmp_path / "engine.json.part").exists()


def test_engine_profile_splits_a_call_by_kind_of_work(tmp_path):
    out = tmp_path / "engine.json"
    stdout = _run("load.bench_engine", "--variants", "fp16", "--batches", "2", "--profile",
                  "--out", str(out))
    (variant,) = json.loads(out.read_text())["variants"]
    profile = variant["profile"]
    assert profile["measured"] == "cpu aten operators"
    kinds = profile["kinds"]
    # The tiny UNet has all of them: linear layers, resnet convolutions, attention, norms.
    assert {"matmul", "convolution", "attention", "normalisation"} <= set(kinds)
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(1)
    assert sum(k["ms"] for k in kinds.values()) == pytest.approx(profile["total_ms"])
    assert profile["top"][0]["ms"] >= profile["top"][-1]["ms"] > 0
    assert "cpu aten operators: " in stdout


def _fp8_layer_names(denoiser) -> set[str]:
    """The layers FP8 takes in `denoiser` with fused QKV, as load.fp8_error prepares it."""
    from deployments.engines.speed import fp8_candidates, fuse_qkv

    fuse_qkv(denoiser)
    names = {id(m): name for name, m in denoiser.named_modules()}
    return {names[id(layer)] for *_, layer in fp8_candidates(denoiser)}


def test_fp8_error_measures_every_layer_fp8_takes_against_float32(tmp_path, tiny_sdxl_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "fp8.json"
    stdout = _run("load.fp8_error", "--model", str(tiny_sdxl_path), "--steps", "2",
                  "--out", str(out))
    report = json.loads(out.read_text())
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path / "unet")
    assert set(report["by_layer"]) == _fp8_layer_names(unet)
    s = report["summary"]
    # bfloat16 keeps 8 significant bits and e4m3 4: each rounds at its own scale.
    assert 0 < s["bf16"]["max"] < 0.01
    for name in ("fp8-row", "fp8-row-slowaccum", "fp8-tensor"):
        assert 0.01 < s[name]["median"] < 0.08 and s[name]["median_vs_bf16"] > 4
        assert s[name]["worst"][0]["error"] == s[name]["max"]
    assert report["call_dtype"] == "torch.float32"  # a CPU serves float32
    assert "fp8-tensor" in stdout and "layers, relative error" in stdout


def test_fp8_error_measures_the_flux_transformer(tmp_path, tiny_flux_path):
    from diffusers import FluxTransformer2DModel

    out = tmp_path / "fp8.json"
    _run("load.fp8_error", "--family", "flux", "--steps", "2", "--out", str(out))
    report = json.loads(out.read_text())
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_path / "transformer")
    assert set(report["by_layer"]) == _fp8_layer_names(transformer)
    assert report["settings"]["family"] == "flux"
    s = report["summary"]
    assert 0 < s["bf16"]["max"] < 0.01 and s["fp8-row"]["median_vs_bf16"] > 4


def test_adapter_benchmark_merges_adapters_into_fp8_and_fused_layers(tmp_path):
    out = tmp_path / "adapters.json"
    _run("load.bench_adapters", "--fuse", "--variant", "fp8", "--adapters", "3",
         "--requests", "2", "--steps", "2", "--switch-every", "2", "--out", str(out))
    report = json.loads(out.read_text())
    speed = report["speed"]
    assert speed["fused_qkv"] and speed["unfused_params_dropped"] > 0
    assert speed["fp8_linears"] > 0 and speed["fp8_scaling"] == "row"
    assert len(report["read_ms"]) == len(report["inject_ms"]) == 3
    assert report["held_switch_ms_median"] > 0
    assert report["throughput_loss"] == pytest.approx(
        1 - report["images_per_s_switching"] / report["images_per_s_one_adapter"])
    # Merged adapters run one set per call: no shared call to measure.
    assert report["mixed_requests"] == 2 and report["images_per_s_mixed_one_call"] is None
    assert report["images_per_s_mixed_call_each"] > 0


def test_adapter_benchmark_runs_slots_with_the_speed_settings_and_mixed_calls(tmp_path):
    out = tmp_path / "adapters.json"
    _run("load.bench_adapters", "--variant", "fp8", "--adapters", "4", "--mixed", "3",
         "--requests", "2", "--steps", "2", "--switch-every", "2", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["speed"]["fused_qkv"] and report["speed"]["fp8_linears"] > 0
    assert report["mixed_requests"] == 3
    assert report["images_per_s_mixed_one_call"] > 0 and report["images_per_s_mixed_call_each"] > 0


def test_adapter_benchmark_switches_flux_adapters_in_slots(tmp_path, tiny_flux_path):
    """FLUX adapters cover every default target of the transformer (attention of both
    streams, feed-forwards, the single blocks' MLP and output, modulation)."""
    out = tmp_path / "adapters.json"
    _run("load.bench_adapters", "--family", "flux", "--rank", "4", "--adapters", "3",
         "--requests", "2", "--steps", "2", "--switch-every", "2", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["settings"]["family"] == "flux"
    assert len(report["read_ms"]) == len(report["inject_ms"]) == 3
    assert report["held_switch_ms_median"] > 0 and report["images_per_s_one_adapter"] > 0
    assert report["throughput_loss"] == pytest.approx(
        1 - report["images_per_s_switching"] / report["images_per_s_one_adapter"])


def test_operator_names_are_sorted_into_kinds():
    from load.profile_ops import kind_of

    cases = {"aten::addmm": "matmul", "nvjet_tst_128x256_64x4_2x1_v_bz": "matmul",
             "triton_tem_fused_mm_0": "matmul", "aten::_scaled_mm": "matmul",
             "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32": "convolution",
             "aten::mkldnn_convolution": "convolution",
             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16": "attention",
             "pytorch_flash::flash_fwd_kernel": "attention",
             "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention",
             "triton_red_fused_native_group_norm_0": "normalisation",
             "void at::native::vectorized_elementwise_kernel<4>": "other", "aten::comm": "other"}
    assert {name: kind_of(name) for name in cases} == cases


def test_img2img_benchmark_times_every_mode_of_both_families(tmp_path, tiny_sdxl_path,
                                                             tiny_flux_path):
    out = tmp_path / "img2img.json"
    stdout = _run("load.bench_img2img", "--size", "64", "--steps", "4", "--repeats", "2",
                  "--out", str(out))
    report = json.loads(out.read_text())
    modes = [(r["family"], r["mode"]) for r in report["rows"]]
    each = ["txt2img", "img2img@0.8", "img2img@1.0", "inpaint@0.8", "txt2img+3 partial"]
    assert modes == [(family, mode) for family in ("sdxl", "flux") for mode in each]
    assert all(0 < r["min_ms"] <= r["median_ms"] for r in report["rows"])
    assert report["device"] == "cpu" and f"saved {out}" in stdout


def test_controlnet_benchmark_times_each_count_and_batch(tmp_path, cache_dir):
    from diffusers import ControlNetModel

    from deployments.tiny import TINY_SDXL_CONTROLNET, ensure_embedded

    out = tmp_path / "controlnet.json"
    stdout = _run("load.bench_controlnet", "--size", "64", "--steps", "2", "--batches", "1",
                  "2", "--repeats", "2", "--out", str(out))
    report = json.loads(out.read_text())
    assert [(r["batch"], r["controlnets"]) for r in report["rows"]] == [
        (b, n) for b in (1, 2) for n in (0, 1, 2)]
    for r in report["rows"]:
        assert 0 < r["min_s"] <= r["median_s"]
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_s"], rel=0.01)
    none = {r["batch"]: r["median_s"] for r in report["rows"] if r["controlnets"] == 0}
    for r in report["rows"]:
        assert r["time_vs_none"] == pytest.approx(r["median_s"] / none[r["batch"]], rel=0.01)
    net = ControlNetModel.from_pretrained(ensure_embedded(TINY_SDXL_CONTROLNET, cache_dir))
    assert report["controlnet_weight_bytes"] == sum(p.numel() * 4 for p in net.parameters())
    assert report["weights"]["controlnet net0"] == "float32" and f"saved {out}" in stdout


def test_controlnet_benchmark_times_two_modes_of_one_flux_union(tmp_path, cache_dir):
    from diffusers import FluxControlNetModel

    from deployments.tiny import TINY_FLUX_CONTROLNET, ensure_embedded

    out = tmp_path / "controlnet-flux.json"
    _run("load.bench_controlnet", "--flux", "--size", "64", "--steps", "2", "--batches", "1",
         "--repeats", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert (report["model"], report["guidance_scale"]) == ("tiny-flux", 3.5)
    assert [(r["batch"], r["controlnets"]) for r in report["rows"]] == [(1, 0), (1, 1), (1, 2)]
    assert all(r["time_vs_none"] > 0 for r in report["rows"])
    net = FluxControlNetModel.from_pretrained(ensure_embedded(TINY_FLUX_CONTROLNET, cache_dir))
    assert report["controlnet_weight_bytes"] == sum(p.numel() * 4 for p in net.parameters())
    assert report["weights"]["controlnet net1"] == report["weights"]["transformer"] == "float32"


def test_image_prompt_benchmark_times_each_case_and_the_encoding(tmp_path, cache_dir):
    from safetensors.torch import load_file

    from deployments.tiny import TINY_SDXL_IP_ADAPTER, ensure_embedded

    out = tmp_path / "image-prompts.json"
    stdout = _run("load.bench_image_prompts", "--size", "64", "--steps", "2", "--batches", "1",
                  "2", "--repeats", "2", "--two-adapters", "--boards", "--masks", "--out",
                  str(out))
    report = json.loads(out.read_text())
    boards, masked = "boards of 4 and 3 prompted", "all prompted, masked"
    assert [(r["batch"], r["case"], r["prompted"]) for r in report["rows"]] == [
        (1, "no adapter", 0), (1, "none prompted", 0), (1, "half prompted", 0),
        (1, "all prompted", 1), (1, "both adapters prompted", 1), (1, boards, 1),
        (1, masked, 1), (2, "no adapter", 0), (2, "none prompted", 0),
        (2, "half prompted", 1), (2, "all prompted", 2), (2, "both adapters prompted", 2),
        (2, boards, 2), (2, masked, 2)]
    # The second adapter sits beside a copy of the embedded one's files, which stay as built.
    two = cache_dir / "tiny-sdxl-ip-adapters-two" / "sdxl_models"
    assert (two / "ip-adapter-plus_sdxl.safetensors").is_file()
    assert not (ensure_embedded(TINY_SDXL_IP_ADAPTER, cache_dir) / "sdxl_models"
                / "ip-adapter-plus_sdxl.safetensors").exists()
    plain = {r["batch"]: r["median_s"] for r in report["rows"] if r["case"] == "no adapter"}
    for r in report["rows"]:
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_s"], rel=0.01)
        assert r["time_vs_no_adapter"] == pytest.approx(r["median_s"] / plain[r["batch"]],
                                                        rel=0.01)
    # The adapter's own layers are its weights file's tensors, loaded in float32.
    weights = load_file(ensure_embedded(TINY_SDXL_IP_ADAPTER, cache_dir)
                        / "sdxl_models" / "ip-adapter_sdxl.safetensors")
    assert report["adapter_layers_bytes"] == sum(t.numel() * 4 for t in weights.values())
    assert report["image_encoder_bytes"] > 0 and report["encoding_s"] > 0
    assert report["weights"]["ip-adapter image_encoder"] == "float32"
    assert f"saved {out}" in stdout


def test_image_prompt_benchmark_runs_flux_with_xlabs_adapter(tmp_path, cache_dir):
    from safetensors.torch import load_file

    from deployments.tiny import TINY_FLUX_IP_ADAPTER, ensure_embedded

    out = tmp_path / "flux-image-prompts.json"
    _run("load.bench_image_prompts", "--family", "flux", "--size", "64", "--steps", "2",
         "--batches", "2", "--repeats", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert (report["model"], report["guidance_scale"]) == ("tiny-flux", 3.5)
    assert [(r["case"], r["prompted"]) for r in report["rows"]] == [
        ("no adapter", 0), ("none prompted", 0), ("half prompted", 1), ("all prompted", 2)]
    # XLabs' file: the projection and each double-stream block's key and value layers.
    weights = load_file(ensure_embedded(TINY_FLUX_IP_ADAPTER, cache_dir)
                        / "ip_adapter.safetensors")
    assert report["adapter_layers_bytes"] == sum(t.numel() * 4 for t in weights.values())
    assert report["encoding_s"] > 0
    assert report["weights"]["ip-adapter image_encoder"] == report["weights"]["transformer"]


def test_kontext_benchmark_times_edits_beside_text_to_image(tmp_path):
    out = tmp_path / "kontext.json"
    stdout = _run("load.bench_kontext", "--size", "64", "--steps", "2", "--batches", "1", "2",
                  "--repeats", "2", "--out", str(out))
    report = json.loads(out.read_text())
    assert [(r["batch"], r["case"]) for r in report["rows"]] == [
        (1, "txt2img"), (1, "edit"), (1, "edit+1"), (2, "txt2img"), (2, "edit"),
        (2, "edit+1")]
    plain = {r["batch"]: r["median_s"] for r in report["rows"] if r["case"] == "txt2img"}
    for r in report["rows"]:
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_s"], rel=0.01)
        assert r["time_vs_txt2img"] == pytest.approx(r["median_s"] / plain[r["batch"]],
                                                     rel=0.01)
    # 64² is 4x4 packed latent tokens; an edit's reference adds as many again, and a
    # further reference of the same size as many again.
    assert report["tokens_per_image"] == {"txt2img": 16, "edit": 32, "edit+1": 48}
    assert report["model"] == "tiny-flux-kontext" and f"saved {out}" in stdout


def test_kontext_benchmark_serves_a_random_flux_as_kontext_through_links(tmp_path,
                                                                         monkeypatch):
    """The full-size path, at the tiny FLUX's configs: the random FLUX is built once, and
    the Kontext folder links its modules beside Kontext's model_index.json."""
    from deployments.tiny_flux import TINY_FLUX_CONFIGS
    from load import bench_kontext

    configs = tmp_path / "small-flux-configs.json"
    configs.write_text(json.dumps(TINY_FLUX_CONFIGS))
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path / "cache"))
    report = bench_kontext.main(["--random-flux", str(configs), "--size", "32", "--steps", "1",
                                 "--batches", "1", "--repeats", "1",
                                 "--out", str(tmp_path / "out.json")])
    flux, kontext = tmp_path / "cache" / "random-small-flux", tmp_path / "cache" / \
        "random-small-flux-kontext"
    assert json.loads((kontext / "model_index.json").read_text())["_class_name"] == \
        "FluxKontextPipeline"
    assert (kontext / "transformer").resolve() == (flux / "transformer").resolve()
    assert (kontext / "transformer").is_symlink()
    assert report["model"] == "random-flux-kontext"
    assert report["tokens_per_image"] == {"txt2img": 4, "edit": 8, "edit+1": 12}


def test_fill_benchmark_times_fills_beside_flux_inpainting(tmp_path):
    out = tmp_path / "fill.json"
    stdout = _run("load.bench_fill", "--size", "64", "--steps", "2", "--batches", "1", "2",
                  "--repeats", "2", "--out", str(out))
    report = json.loads(out.read_text())
    assert [(r["batch"], r["case"]) for r in report["rows"]] == [
        (1, "inpaint"), (1, "fill"), (2, "inpaint"), (2, "fill")]
    plain = {r["batch"]: r["median_s"] for r in report["rows"] if r["case"] == "inpaint"}
    for r in report["rows"]:
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_s"], rel=0.01)
        assert r["time_vs_inpaint"] == pytest.approx(r["median_s"] / plain[r["batch"]],
                                                     rel=0.01)
    assert report["input_channels_per_token"] == {"inpaint": 64, "fill": 384}
    assert report["model"] == "tiny-flux" and f"saved {out}" in stdout


def test_fill_benchmark_builds_a_random_fill_beside_the_random_flux(tmp_path, monkeypatch):
    """The full-size path, at the tiny FLUX's configs: the random FLUX built once, and the
    Fill folder a random transformer with the wider input beside links to its other
    modules."""
    from deployments.tiny_flux import TINY_FLUX_CONFIGS
    from load import bench_fill

    configs = tmp_path / "small-flux-configs.json"
    configs.write_text(json.dumps(TINY_FLUX_CONFIGS))
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path / "cache"))
    report = bench_fill.main(["--random-flux", str(configs), "--size", "32", "--steps", "1",
                              "--batches", "1", "--repeats", "1",
                              "--out", str(tmp_path / "out.json")])
    flux, fill = tmp_path / "cache" / "random-small-flux", tmp_path / "cache" / \
        "random-small-flux-fill"
    assert json.loads((fill / "model_index.json").read_text())["_class_name"] == \
        "FluxFillPipeline"
    assert (fill / "text_encoder_2").is_symlink() and not (fill / "transformer").is_symlink()
    assert (fill / "text_encoder_2").resolve() == (flux / "text_encoder_2").resolve()
    assert report["model"] == "random-flux"
    assert report["input_channels_per_token"] == {"inpaint": 64, "fill": 384}


def test_redux_benchmark_times_pictured_calls_beside_plain_ones(tmp_path):
    out = tmp_path / "redux.json"
    stdout = _run("load.bench_redux", "--size", "64", "--steps", "2", "--batches", "1", "2",
                  "--repeats", "2", "--out", str(out))
    report = json.loads(out.read_text())
    assert [(r["batch"], r["case"]) for r in report["rows"]] == [
        (b, case) for b in (1, 2) for case in ("plain", "redux", "redux-3")]
    plain = {r["batch"]: r["median_s"] for r in report["rows"] if r["case"] == "plain"}
    for r in report["rows"]:
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_s"], rel=0.01)
        assert r["time_vs_plain"] == pytest.approx(r["median_s"] / plain[r["batch"]],
                                                   rel=0.01)
    # The tiny T5 reads 256 tokens; the tiny Redux adds its 8x8 patches, or 2x2.
    assert report["text_tokens_per_image"] == {"plain": 256, "redux": 320, "redux-3": 260}
    assert report["encode_s_per_picture"] > 0
    assert report["model"] == "tiny-flux" and f"saved {out}" in stdout


def test_redux_benchmark_builds_a_random_redux_for_the_random_flux(tmp_path, monkeypatch):
    """The full-size path, at the tiny FLUX's configs and a small SigLIP: the random Redux
    is built once beside the random FLUX, its tokens as wide as that transformer's."""
    from deployments.tiny_flux import TINY_FLUX_CONFIGS, TINY_SIGLIP
    from load import bench_redux

    configs = tmp_path / "small-flux-configs.json"
    configs.write_text(json.dumps(TINY_FLUX_CONFIGS))
    monkeypatch.setenv("ATELIER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(bench_redux, "SIGLIP_SO400M", TINY_SIGLIP)
    report = bench_redux.main(["--random-flux", str(configs), "--size", "32", "--steps", "1",
                               "--batches", "1", "--repeats", "1",
                               "--out", str(tmp_path / "out.json")])
    redux = tmp_path / "cache" / "random-small-flux-redux"
    assert json.loads((redux / "model_index.json").read_text())["_class_name"] == \
        "FluxPriorReduxPipeline"
    embedder = json.loads((redux / "image_embedder" / "config.json").read_text())
    assert embedder["txt_in_features"] == TINY_FLUX_CONFIGS["transformer"][
        "joint_attention_dim"]
    assert report["model"] == "random-flux"
    assert report["text_tokens_per_image"]["redux"] == 320


def test_sdxl_options_benchmark_times_each_option_against_the_plain_call(tmp_path):
    out = tmp_path / "sdxl-options.json"
    stdout = _run("load.bench_sdxl_options", "--size", "64", "--steps", "4", "--batches", "1",
                  "2", "--repeats", "2", "--out", str(out))
    report = json.loads(out.read_text())
    rows = {(r["option"], r["batch"]): r for r in report["rows"]}
    assert len(rows) == 20 and report["model"] == "tiny-sdxl"
    for (option, batch), r in rows.items():
        assert 0 < r["min_s"] <= r["median_s"]
        assert r["images_per_s"] == pytest.approx(batch / r["median_s"], rel=0.01)
        plain = rows["plain", batch]["median_s"]
        assert r["time_vs_plain"] == pytest.approx(r["median_s"] / plain, rel=0.01)
    assert [rows[o, 1]["chunks"] for o in ("plain", "prompt of 200 words")] == [[1], [3]]
    assert rows["prompts of 1 and 3 chunks", 2]["chunks"] == [1, 3]  # one call of both
    assert rows["hires 1.5x", 1]["output_size"] == 96 and rows["plain", 1]["output_size"] == 64
    assert rows["hires 1.5x, ESRGAN x4", 1]["output_size"] == 96
    assert rows["hires 1.5x, ESRGAN x4 untiled", 1]["output_size"] == 96
    assert rows["upscale 2x, ESRGAN x4", 1]["output_size"] == 128
    assert f"saved {out}" in stdout


def test_the_options_benchmark_times_flux_s_options_too(tmp_path):
    out = tmp_path / "flux-options.json"
    _run("load.bench_sdxl_options", "--family", "flux", "--size", "64", "--steps", "2",
         "--batches", "1", "--repeats", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["benchmark"] == "flux-options" and report["model"] == "tiny-flux"
    sizes = {r["option"]: r["output_size"] for r in report["rows"]}
    assert sizes == {"plain": 64, "hires 1.5x": 96, "hires 1.5x, ESRGAN x4": 96,
                     "hires 1.5x, ESRGAN x4 untiled": 96, "upscale 2x, ESRGAN x4": 128}
    assert all("chunks" not in r and r["median_s"] > 0 for r in report["rows"])


def test_status_benchmark_times_the_ingress_read_beside_serve_status(tmp_path, cache_dir):
    out = tmp_path / "status.json"
    stdout = _run("load.bench_status", "--models", "2", "--reads", "3", "--cache-dir",
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
