"""The engine benchmarks end to end on the tiny models (FLOP counts, `load.bench_engine`
with its profile, `load.fp8_error`, `load.bench_adapters`): the same commands that
measure a GPU, with small sizes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.commands.programs import ROOT, run_program


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
    stdout = run_program("load.bench_engine", "--family", "flux", "--variants", "bf16", "bf16",
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
    stdout = run_program("load.bench_engine", "--variants", "fp16", "fp16", "fp8", "--batches", "1",
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
    run_program("load.bench_engine", "--variants", "fp16", "--guidance", "0", "--steps", "4",
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
    stdout = run_program("load.bench_engine", "--variants", "fp16", "--batches", "2", "--profile",
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
    stdout = run_program("load.fp8_error", "--model", str(tiny_sdxl_path), "--steps", "2",
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
    run_program("load.fp8_error", "--family", "flux", "--steps", "2", "--out", str(out))
    report = json.loads(out.read_text())
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_path / "transformer")
    assert set(report["by_layer"]) == _fp8_layer_names(transformer)
    assert report["settings"]["family"] == "flux"
    s = report["summary"]
    assert 0 < s["bf16"]["max"] < 0.01 and s["fp8-row"]["median_vs_bf16"] > 4


def test_adapter_benchmark_merges_adapters_into_fp8_and_fused_layers(tmp_path):
    out = tmp_path / "adapters.json"
    run_program("load.bench_adapters", "--fuse", "--variant", "fp8", "--adapters", "3",
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
    run_program("load.bench_adapters", "--variant", "fp8", "--adapters", "4", "--mixed", "3",
                "--requests", "2", "--steps", "2", "--switch-every", "2", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["speed"]["fused_qkv"] and report["speed"]["fp8_linears"] > 0
    assert report["mixed_requests"] == 3
    assert report["images_per_s_mixed_one_call"] > 0 and report["images_per_s_mixed_call_each"] > 0


def test_adapter_benchmark_switches_flux_adapters_in_slots(tmp_path, tiny_flux_path):
    """FLUX adapters cover every default target of the transformer (attention of both
    streams, feed-forwards, the single blocks' MLP and output, modulation)."""
    out = tmp_path / "adapters.json"
    run_program("load.bench_adapters", "--family", "flux", "--rank", "4", "--adapters", "3",
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
