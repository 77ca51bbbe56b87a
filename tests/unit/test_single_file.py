"""Single-file SDXL checkpoints: converted once with a folder's configs, served as the
diffusers folder of the same weights is."""

import shutil

import numpy as np
import pytest
import torch

from serve.config import ModelConfig
from serve.types import GenerationRequest
from tests.single_file import save_single_file, scaled_fp8

# The tiny SDXL with a wider second text encoder: in the original layout diffusers tells
# the two encoders apart by their widths (768 and 1280 in the real model).
_WIDER = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": 48,
          "hidden_act": "gelu"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(the model as a diffusers folder in float16, the same as one original-layout file,
    a folder of its configs and tokenizers alone)."""
    from diffusers import StableDiffusionXLPipeline

    from deployments.tiny import TINY_SDXL_CONFIGS, build_random_sdxl

    root = tmp_path_factory.mktemp("single-file")
    unet = {**TINY_SDXL_CONFIGS["unet"], "cross_attention_dim": 32 + 48,
            "projection_class_embeddings_input_dim": 6 * 8 + 48}
    build_random_sdxl(root / "folder", {**TINY_SDXL_CONFIGS, "unet": unet,
                                        "text_encoder_2": _WIDER}, dtype="float16")
    pipe = StableDiffusionXLPipeline.from_pretrained(root / "folder", local_files_only=True,
                                                     dtype=torch.float16)
    save_single_file(pipe, root / "fine-tune.safetensors")
    shutil.copytree(root / "folder", root / "configs",
                    ignore=shutil.ignore_patterns("*.safetensors"))
    return root / "folder", root / "fine-tune.safetensors", root / "configs"


def _model(checkpoint):
    _, file, configs = checkpoint
    return ModelConfig.model_validate({"id": "acme/fine-tune", "path": str(file),
                                       "configs_from": str(configs), "dtype": "float16",
                                       "defaults": {"width": 64, "height": 64}})


def test_a_checkpoint_is_converted_once_into_the_cache_with_every_weight_kept(
        checkpoint, tmp_path):
    from safetensors.torch import load_file

    from deployments.engines import model_path

    folder = checkpoint[0]
    converted = model_path(_model(checkpoint), tmp_path)
    assert converted.parent == tmp_path / "converted"
    assert converted.name.startswith("fine-tune-")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (theirs,) = (folder / part).glob("*.safetensors")
        (ours,) = (converted / part).glob("*.safetensors")
        a, b = load_file(theirs), load_file(ours)
        assert set(a) == set(b), part
        assert all(torch.equal(a[k], b[k]) and b[k].dtype == torch.float16 for k in a), part
    written = {p: p.stat().st_mtime_ns for p in converted.rglob("*") if p.is_file()}
    assert model_path(_model(checkpoint), tmp_path) == converted
    assert {p: p.stat().st_mtime_ns for p in converted.rglob("*") if p.is_file()} == written


def test_a_converted_checkpoint_draws_the_pixels_of_its_diffusers_folder(checkpoint, tmp_path):
    from deployments.engines import create_engine

    folder = checkpoint[0]
    model = _model(checkpoint)
    request = GenerationRequest.for_model(model, "a red cube", seed=5, num_inference_steps=3)
    from_file = create_engine(model, tmp_path, None)
    from_folder = create_engine(ModelConfig.model_validate(
        {"id": "acme/fine-tune", "path": str(folder)}), tmp_path, None)
    (a,), (b,) = from_file.generate([request])[0], from_folder.generate([request])[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).std() > 1  # an image, not a blank


@pytest.mark.parametrize("scale,per_row", [("scale_weight", False), ("weight_scale", True)])
def test_a_scaled_fp8_checkpoint_is_converted_to_its_weights_times_their_scales(
        checkpoint, tmp_path, scale, per_row):
    """ComfyUI's "scaled" FP8 SDXL files. diffusers' pipeline converter reads files only and
    would drop the scales: the weights are written dequantized first, and the converted
    pipeline is that of the file of the values the scaled one stands for."""
    from safetensors.torch import load_file, save_file

    from deployments.engines.loading import converted_checkpoint

    folder, file, configs = checkpoint
    stored, values = scaled_fp8(load_file(file), scale, per_row, dtype=torch.float16)
    save_file(stored, str(tmp_path / "scaled.safetensors"))
    save_file(values, str(tmp_path / "values.safetensors"))
    ours, expected = (converted_checkpoint(tmp_path / f"{name}.safetensors", configs,
                                           tmp_path, "sdxl") for name in ("scaled", "values"))
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (a,), (b,) = (ours / part).glob("*.safetensors"), (expected / part).glob("*.safetensors")
        a, b = load_file(a), load_file(b)
        assert set(a) == set(b), part
        assert all(a[k].dtype == torch.float16 and torch.equal(a[k], b[k]) for k in a), part
    (theirs,) = (folder / "unet").glob("*.safetensors")
    theirs, unet = load_file(theirs), load_file(next((ours / "unet").glob("*.safetensors")))
    assert not all(torch.equal(theirs[k], unet[k]) for k in theirs)  # FP8 rounded them
    assert not list((tmp_path / "converted").glob("*.safetensors"))  # the dequantized file


def test_the_version_follows_the_files_bytes_and_the_configs(checkpoint, tmp_path):
    from serve.versions import version_id

    _, file, configs = checkpoint
    work = tmp_path / "work"
    shutil.copytree(configs, work / "configs")
    shutil.copy(file, work / "model.safetensors")
    model = ModelConfig.model_validate({"id": "acme/fine-tune",
                                        "path": str(work / "model.safetensors"),
                                        "configs_from": str(work / "configs")})
    first = version_id(model, tmp_path)
    (work / "configs" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unread")
    assert version_id(model, tmp_path) == first  # the configs folder's weights are not read
    scheduler = work / "configs" / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace("scaled_linear", "linear"))
    second = version_id(model, tmp_path)
    data = bytearray((work / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (work / "model.safetensors").write_bytes(bytes(data))
    assert len({first, second, version_id(model, tmp_path)}) == 3
