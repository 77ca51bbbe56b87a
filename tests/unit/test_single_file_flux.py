"""Single-file FLUX transformers (Black Forest Labs' layout): converted once, served with the
other modules of a FLUX folder, as the diffusers folder of the same weights is."""

import shutil

import numpy as np
import pytest
import torch

from serve.config import ModelConfig
from serve.types import GenerationRequest
from tests.single_file import save_flux_transformer_file, scaled_fp8

# diffusers converts these files at FLUX.1's own width only (3072: 24 heads of 128), so
# the tiny FLUX gets a transformer that wide, of one block of each kind (530 M parameters).
_WIDE = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
         "num_attention_heads": 24, "axes_dims_rope": [16, 56, 56]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(the model as a diffusers folder in bfloat16, its transformer as one file, a FLUX
    folder without the transformer's weights)."""
    from diffusers import FluxTransformer2DModel

    from deployments.tiny_flux import TINY_FLUX_CONFIGS, build_random_flux

    root = tmp_path_factory.mktemp("single-file-flux")
    configs = {**TINY_FLUX_CONFIGS, "tokenizer_2": {"model_max_length": 16},
               "transformer": {**TINY_FLUX_CONFIGS["transformer"], **_WIDE}}
    build_random_flux(root / "folder", configs, dtype="bfloat16")
    transformer = FluxTransformer2DModel.from_pretrained(root / "folder" / "transformer",
                                                         dtype=torch.bfloat16)
    save_flux_transformer_file(transformer, root / "fine-tune.safetensors")
    save_flux_transformer_file(transformer, root / "fine-tune-fp8.safetensors",
                               torch.float8_e4m3fn, prefix="model.diffusion_model.")
    shutil.copytree(root / "folder", root / "base", ignore=lambda d, names: [
        n for n in names if d.endswith("transformer") and n.endswith(".safetensors")])
    return root / "folder", root / "fine-tune.safetensors", root / "base"


def _model(file, configs):
    return ModelConfig.model_validate({"id": "acme/flux-tune", "family": "flux",
                                       "path": str(file), "configs_from": str(configs),
                                       "dtype": "bfloat16",
                                       "defaults": {"width": 64, "height": 64}})


def _transformer_weights(folder):
    from safetensors.torch import load_file

    (file,) = (folder / "transformer").glob("*.safetensors")
    return load_file(file)


@pytest.fixture(scope="module")
def plain_fp8(checkpoint, tmp_path_factory):
    """The transformer's weights converted from its FP8 file in ComfyUI's names."""
    from deployments.engines import model_path

    _, file, base = checkpoint
    fp8 = _model(file.with_name("fine-tune-fp8.safetensors"), base)
    return _transformer_weights(model_path(fp8, tmp_path_factory.mktemp("plain-fp8")))


def test_the_transformer_is_converted_once_and_the_rest_linked(checkpoint, tmp_path):
    from deployments.engines import model_path

    folder, file, base = checkpoint
    converted = model_path(_model(file, base), tmp_path)
    assert converted.parent == tmp_path / "converted"
    theirs, ours = _transformer_weights(folder), _transformer_weights(converted)
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) and ours[k].dtype == torch.bfloat16
               for k in theirs)
    linked = {p.name: p.resolve() for p in converted.iterdir() if p.is_symlink()}
    assert linked == {p.name: p for p in base.resolve().iterdir() if p.name != "transformer"}
    assert "vae" in linked and "text_encoder_2" in linked
    written = {p: p.stat().st_mtime_ns for p in converted.rglob("*") if p.is_file()}
    assert model_path(_model(file, base), tmp_path) == converted
    assert {p: p.stat().st_mtime_ns for p in converted.rglob("*") if p.is_file()} == written


def test_an_fp8_file_in_comfyuis_names_is_converted_to_bfloat16_exactly(checkpoint, plain_fp8):
    theirs, ours = _transformer_weights(checkpoint[0]), plain_fp8
    assert all(ours[k].dtype == torch.bfloat16 for k in ours)
    assert all(torch.equal(theirs[k].to(torch.float8_e4m3fn).to(torch.bfloat16), ours[k])
               for k in theirs)
    assert not all(torch.equal(theirs[k], ours[k]) for k in theirs)  # FP8 rounded them


@pytest.mark.parametrize("scale,per_row,prefix", [
    ("scale_weight", False, ""), ("weight_scale", True, "model.diffusion_model.")])
def test_a_scaled_fp8_file_is_converted_to_its_weights_times_their_scales(
        checkpoint, plain_fp8, tmp_path, scale, per_row, prefix):
    """As ComfyUI's "scaled" FP8 files (older and newer names) are shared: the converted
    weights are those of the bfloat16 file of the values the file stands for, closer to
    the fine-tune's than plain FP8 keeps them."""
    from safetensors.torch import load_file, save_file

    from deployments.engines import model_path

    folder, file, base = checkpoint
    stored, values = scaled_fp8(load_file(file), scale, per_row)
    save_file({prefix + k: v for k, v in stored.items()}, str(tmp_path / "scaled.safetensors"))
    save_file(values, str(tmp_path / "values.safetensors"))
    ours = _transformer_weights(model_path(_model(tmp_path / "scaled.safetensors", base), tmp_path))
    expected = _transformer_weights(model_path(_model(tmp_path / "values.safetensors", base),
                                               tmp_path))
    assert set(ours) == set(expected)
    assert all(ours[k].dtype == torch.bfloat16 and torch.equal(ours[k], expected[k])
               for k in ours)
    theirs = _transformer_weights(folder)
    matrices = [k for k in theirs if "blocks." in k and theirs[k].dim() == 2]
    err = {name: sum((w[k].float() - theirs[k].float()).abs().mean() for k in matrices)
           for name, w in (("scaled", ours), ("plain", plain_fp8))}
    assert err["scaled"] < err["plain"] / 2, err


def test_scales_other_than_per_tensor_or_per_row_are_refused_naming_them(checkpoint, tmp_path):
    from safetensors.torch import save_file

    from deployments.engines import model_path

    scaled = tmp_path / "blocks.safetensors"
    weight = torch.ones(8, 32).to(torch.float8_e4m3fn)
    save_file({"double_blocks.0.img_attn.qkv.weight": weight,  # one scale per 16 values
               "double_blocks.0.img_attn.qkv.weight_scale": torch.ones(8, 2)}, str(scaled))
    with pytest.raises(ValueError, match=r"blocks\.safetensors: the scale double_blocks\.0\."
                       r"img_attn\.qkv\.weight_scale \(8, 2\) is neither one per tensor"):
        model_path(_model(scaled, checkpoint[2]), tmp_path)
    assert not (tmp_path / "converted").exists()


def test_a_converted_transformer_draws_the_pixels_of_its_diffusers_folder(checkpoint, tmp_path):
    from deployments.engines import create_engine

    folder, file, base = checkpoint
    model = _model(file, base)
    request = GenerationRequest.for_model(model, "a red cube", seed=5, num_inference_steps=2)
    from_file = create_engine(model, tmp_path, None)
    (a,) = from_file.generate([request])[0]
    del from_file
    from_folder = create_engine(ModelConfig.model_validate(
        {"id": "acme/flux-tune", "family": "flux", "path": str(folder)}), tmp_path, None)
    (b,) = from_folder.generate([request])[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).std() > 1  # an image, not a blank


def test_the_version_follows_the_file_and_the_modules_read_from_the_folder(checkpoint,
                                                                         tmp_path):
    from serve.versions import version_id

    work = tmp_path / "work"
    shutil.copytree(checkpoint[2], work / "base")
    (work / "model.safetensors").write_bytes(b"the transformer")  # only its bytes count here
    model = _model(work / "model.safetensors", work / "base")
    first = version_id(model, tmp_path)
    (work / "base" / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (work / "base" / "flux1-dev.safetensors").write_bytes(b"x")  # as the BFL repository has
    assert version_id(model, tmp_path) == first  # weights the model does not read
    (vae,) = (work / "base" / "vae").glob("*.safetensors")
    vae.write_bytes(vae.read_bytes()[:-1] + b" ")
    second = version_id(model, tmp_path)
    data = bytearray((work / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (work / "model.safetensors").write_bytes(bytes(data))
    assert len({first, second, version_id(model, tmp_path)}) == 3
