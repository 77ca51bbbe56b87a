"""`python -m serve.check`, run as a user runs it: a config for weights on disk (the tiny
SDXL saved in diffusers' layout) is reported with the version the server gives it, and its
LoRA folder's adapters, the unusable one named with why; given through a Serve config,
the same; a config the server's start would refuse exits 1 naming the field."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from serve.config import parse_config
from serve.versions import upscaling_version, version_id

ROOT = Path(__file__).parent.parent.parent


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def _lora(path: Path, rank: int) -> None:
    save_file({"unet.down.lora_A.weight": torch.zeros(rank, 8),
               "unet.down.lora_B.weight": torch.zeros(8, rank)}, str(path))


@pytest.fixture
def config_file(tmp_path, tiny_sdxl_path, cache_dir) -> tuple[Path, dict]:
    loras = tmp_path / "loras"
    loras.mkdir()
    _lora(loras / "ink.safetensors", 4)
    _lora(loras / "huge.safetensors", 128)
    data = {"cache_dir": str(cache_dir),
            "models": [{"id": "acme/sdxl", "path": str(tiny_sdxl_path), "replicas": 2,
                        "aliases": ["stability-ai/sdxl"], "dtype": "float32",
                        "upscalers": {"sharp": {"embedded": "tiny-esrgan"}},
                        "upscaling_aliases": ["nightmareai/real-esrgan"]}],
            "lora_folders": [{"path": str(loras), "base": "sdxl"}]}
    path = tmp_path / "atelier.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


def test_a_config_for_weights_on_disk_is_reported_with_the_servers_version(config_file):
    path, data = config_file
    done = _check(str(path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    model = parse_config(data).models[0]
    version = version_id(model, Path(data["cache_dir"]))  # what the server's start gives
    assert lines[0] == f"{path}: ok, 1 model(s)"
    assert lines[1].startswith("acme/sdxl: sdxl, ") and "2 replica(s)" in lines[1]
    assert "  aliases: stability-ai/sdxl" in lines and "  upscalers: sharp" in lines
    assert f"  version {version}" in lines
    alias = upscaling_version(version, "nightmareai/real-esrgan")
    assert f"  nightmareai/real-esrgan: version {alias} (real-esrgan's inputs)" in lines
    assert any(line.startswith("  weights: 4.7 MB in float32 (unet 4.1 MB, ") for line in lines)
    assert ("GPUs the replicas reserve on a cluster with GPUs: 2 at start, 2 at most "
            "(any type: 2)") in lines
    assert lines[-2:] == [
        "LoRA adapters in folders: 2",
        "  unusable: adapter 'huge' has rank 128, above this model's max_lora_rank 64"]


def test_a_serve_config_is_checked_through_the_atelier_config_it_names(config_file, tmp_path):
    path, _ = config_file
    serve_config = tmp_path / "serve_config.yaml"
    serve_config.write_text(yaml.safe_dump({"applications": [
        {"name": "images", "import_path": "serve.app:build_app",
         "args": {"config": str(path)}}]}))
    done = _check(str(serve_config))
    assert done.returncode == 0, done.stderr
    direct = _check(str(path)).stdout.splitlines()
    lines = done.stdout.splitlines()
    assert lines[0] == f"application 'images' ({path}): ok, 1 model(s)"
    assert lines[1:] == direct[1:]


def test_the_gpus_reserved_are_summed_by_type_at_start_and_at_most(config_file):
    path, data = config_file
    sdxl = data["models"][0]
    data["models"] = [
        sdxl | {"replicas": 1, "gpu_share": 0.5, "accelerator_type": "L40S",
                "autoscaling": {"max_replicas": 3}},
        sdxl | {"id": "acme/sdxl-b", "device": "cuda", "aliases": [],
                "upscaling_aliases": []},
        sdxl | {"id": "acme/sdxl-c", "device": "cpu", "aliases": [], "upscaling_aliases": []}]
    path.write_text(yaml.safe_dump(data))
    done = _check(str(path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert ("GPUs the replicas reserve on a cluster with GPUs: 2.5 at start, 3.5 at most "
            "(L40S: 0.5 to 1.5; any type: 2)") in lines
    assert lines[1].endswith("1 to 3 replicas (autoscaled) of 0.5 GPU (L40S)")


@pytest.mark.parametrize(("change", "field"), [
    ({"path": "/nowhere/sdxl"}, "models.0.path: /nowhere/sdxl does not exist"),
    ({"replicas": 0}, "models.0.replicas"),
    ({"upscalers": {}}, "upscaling_aliases: the model needs an upscaler"),
])
def test_a_config_the_server_would_refuse_exits_1_naming_the_field(config_file, change,
                                                                   field):
    path, data = config_file
    data["models"][0] |= change
    path.write_text(yaml.safe_dump(data))
    done = _check(str(path))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("refused: ") and field in done.stderr


def test_the_weights_are_counted_from_the_files_headers_as_diffusers_loads_them(
        tiny_sdxl_path, tmp_path):
    """Each module's bytes in the model's dtype equal its parameters as diffusers loads
    the folder; a variant counts its own files alone."""
    import shutil

    from diffusers import StableDiffusionXLPipeline

    from serve.check import weight_bytes
    from serve.config import ModelConfig

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    model = ModelConfig(id="a/b", path=tiny_sdxl_path, dtype="float16")
    assert weight_bytes(model) == {
        name: 2 * sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "text_encoder", "text_encoder_2", "vae")}
    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl_path, folder)
    for module in ("unet", "text_encoder", "text_encoder_2", "vae"):
        save_file({"w": torch.zeros(10, 10)},
                  str(next((folder / module).glob("*.safetensors")).with_suffix(
                      ".fp16.safetensors")))
    variant = ModelConfig(id="a/b", path=folder, variant="fp16", dtype="float16")
    assert weight_bytes(variant) == dict.fromkeys(("unet", "text_encoder", "text_encoder_2",
                                                   "vae"), 200)
    assert weight_bytes(ModelConfig(id="a/b", embedded="tiny-sdxl")) == {}
