"""A model's `vae`: a diffusers AutoencoderKL folder in place of the checkpoint's (as
madebyollin/sdxl-vae-fp16-fix is used), on the tiny SDXL and FLUX (CPU): its weights
decode every mode's images, the pixels are diffusers' with that VAE, and the config
checks the folder and the family's latent channels; the version follows its bytes."""

import json
import shutil

import numpy as np
import pytest
import torch

from serve.config import ConfigError, ModelConfig, parse_config
from serve.types import GenerationRequest
from serve.versions import version_id
from tests.unit.test_engine import _px, assert_same_pixels

REQUEST = GenerationRequest(model="a/b", prompt="a red cube", width=64, height=64,
                            num_inference_steps=3, guidance_scale=5.0, seed=4,
                            scheduler="K_EULER")


def _random_vae(folder, configs: dict, seed: int):
    """An AutoencoderKL of the tiny family's design with other random weights, saved as a
    VAE folder is shared (config.json, diffusion_pytorch_model.safetensors)."""
    from diffusers import AutoencoderKL

    from deployments.tiny import public_fields

    torch.manual_seed(seed)
    AutoencoderKL(**public_fields(configs), force_upcast=False).save_pretrained(
        folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sdxl_vae(tmp_path_factory):
    from deployments.tiny import TINY_SDXL_CONFIGS

    return _random_vae(tmp_path_factory.mktemp("sdxl-vae"), TINY_SDXL_CONFIGS["vae"], 77)


@pytest.fixture(scope="module")
def flux_vae(tmp_path_factory):
    from deployments.tiny_flux import TINY_FLUX_CONFIGS

    return _random_vae(tmp_path_factory.mktemp("flux-vae"), TINY_FLUX_CONFIGS["vae"], 78)


def _model(family: str, vae, **extra) -> ModelConfig:
    return ModelConfig(id="a/b", family=family, embedded=f"tiny-{family}",
                       vae=vae, **extra)


def test_an_sdxl_model_decodes_with_the_given_vae_as_diffusers_does(sdxl_vae, tiny_sdxl_path,
                                                                   sdxl, tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from deployments.engines import create_engine

    engine = create_engine(_model("sdxl", sdxl_vae), tmp_path, None)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl_path, vae=AutoencoderKL.from_pretrained(sdxl_vae), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ours = engine.generate([REQUEST])[0][0]
    theirs = pipe(prompt=REQUEST.prompt, width=64, height=64, num_inference_steps=3,
                  guidance_scale=5.0, generator=torch.Generator().manual_seed(4)).images[0]
    assert_same_pixels(ours, theirs)
    assert np.abs(_px(ours) - _px(sdxl.generate([REQUEST])[0][0])).mean() > 5
    assert all(p.vae is engine.pipe.vae for p in engine._pipes.values())
    assert engine.describe()["vae"] == str(sdxl_vae)
    assert sdxl.describe()["vae"] is None


def test_a_flux_model_loads_the_given_vaes_weights_and_draws_another_image(flux_vae, flux,
                                                                          tmp_path):
    from safetensors.torch import load_file

    from deployments.engines import create_engine

    engine = create_engine(_model("flux", flux_vae), tmp_path, None)
    given = load_file(next(flux_vae.glob("*.safetensors")))
    loaded = engine.pipe.vae.state_dict()
    assert all(torch.equal(loaded[name], weight) for name, weight in given.items())
    request = GenerationRequest(model="a/f", prompt="a red cube", width=64, height=64,
                                num_inference_steps=2, guidance_scale=3.0, seed=4,
                                scheduler="FlowMatchEuler")
    ours, plain = (e.generate([request])[0][0] for e in (engine, flux))
    assert np.abs(_px(ours) - _px(plain)).mean() > 5


def _config(model: dict):
    return parse_config({"models": [{"id": "a/b", **model}]})


def test_the_config_checks_the_vae_folder(sdxl_vae, flux_vae, tmp_path):
    not_a_vae = shutil.copytree(sdxl_vae, tmp_path / "tiny-autoencoder")
    config = not_a_vae / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text())
                                 | {"_class_name": "AutoencoderTiny"}))
    cases = [({"embedded": "tiny-sdxl", "vae": str(tmp_path / "none")},
              r"models\.0\.vae: .* is not a diffusers VAE folder"),
             ({"embedded": "tiny-sdxl", "vae": str(flux_vae)},
              r"models\.0\.vae: .* makes latents of 16 channels; a sdxl model's have 4"),
             ({"family": "flux", "embedded": "tiny-flux", "vae": str(sdxl_vae)},
              r"latents of 4 channels; a flux model's have 16"),
             ({"embedded": "tiny-sdxl", "vae": str(not_a_vae)},
              r"models\.0\.vae: .* holds a AutoencoderTiny, not an AutoencoderKL")]
    for model, message in cases:
        with pytest.raises(ConfigError, match=message):
            _config(model).check_paths()
    _config({"embedded": "tiny-sdxl", "vae": str(sdxl_vae)}).check_paths()


def test_the_version_follows_the_vaes_bytes(sdxl_vae, tmp_path):
    plain, given = (version_id(_model("sdxl", vae), tmp_path) for vae in (None, sdxl_vae))
    changed = shutil.copytree(sdxl_vae, tmp_path / "changed")
    weights = next(changed.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert len({plain, given, version_id(_model("sdxl", changed), tmp_path)}) == 3
    assert version_id(_model("sdxl", sdxl_vae), tmp_path) == given
