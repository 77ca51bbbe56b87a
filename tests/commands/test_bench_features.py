"""The benchmarks of a request's features end to end on the tiny models (img2img,
ControlNets, image prompts, Kontext, Fill, Redux, SDXL's and FLUX's options): the same
commands that measure a GPU, with small sizes."""

import json

import pytest

from tests.commands.programs import run_program


def test_img2img_benchmark_times_every_mode_of_both_families(tmp_path, tiny_sdxl_path,
                                                             tiny_flux_path):
    out = tmp_path / "img2img.json"
    stdout = run_program("load.bench_img2img", "--size", "64", "--steps", "4", "--repeats", "2",
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
    stdout = run_program("load.bench_controlnet", "--size", "64", "--steps", "2", "--batches", "1",
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
    run_program("load.bench_controlnet", "--flux", "--size", "64", "--steps", "2", "--batches", "1",
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
    stdout = run_program("load.bench_image_prompts", "--size", "64", "--steps", "2",
                         "--batches", "1", "2", "--repeats", "2", "--two-adapters", "--boards",
                         "--masks", "--out", str(out))
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
    run_program("load.bench_image_prompts", "--family", "flux", "--size", "64", "--steps", "2",
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
    stdout = run_program("load.bench_kontext", "--size", "64", "--steps", "2", "--batches", "1",
                         "2", "--repeats", "2", "--out", str(out))
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
    stdout = run_program("load.bench_fill", "--size", "64", "--steps", "2", "--batches", "1", "2",
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
    stdout = run_program("load.bench_redux", "--size", "64", "--steps", "2", "--batches", "1", "2",
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
    stdout = run_program("load.bench_sdxl_options", "--size", "64", "--steps", "4",
                         "--batches", "1", "2", "--repeats", "2", "--out", str(out))
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
    run_program("load.bench_sdxl_options", "--family", "flux", "--size", "64", "--steps", "2",
                "--batches", "1", "--repeats", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["benchmark"] == "flux-options" and report["model"] == "tiny-flux"
    sizes = {r["option"]: r["output_size"] for r in report["rows"]}
    assert sizes == {"plain": 64, "hires 1.5x": 96, "hires 1.5x, ESRGAN x4": 96,
                     "hires 1.5x, ESRGAN x4 untiled": 96, "upscale 2x, ESRGAN x4": 128}
    assert all("chunks" not in r and r["median_s"] > 0 for r in report["rows"])
