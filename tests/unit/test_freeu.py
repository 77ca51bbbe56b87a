"""FreeU on an SDXL model (`freeu`), on the tiny SDXL (CPU): every mode's pipeline shares
the re-weighted UNet, whose images are diffusers' with `enable_freeu`; the config takes it
on SDXL alone, and the version follows its scales."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from serve.config import ConfigError, ModelConfig, parse_config
from serve.types import GenerationRequest, SourceImage
from serve.versions import version_id
from tests.unit.test_engine import _px, assert_same_pixels

REQUEST = GenerationRequest(model="a/b", prompt="a red cube", width=64, height=64,
                            num_inference_steps=3, guidance_scale=6.0, seed=4,
                            scheduler="K_EULER")
SDXL_VALUES = {"s1": 0.9, "s2": 0.2, "b1": 1.3, "b2": 1.4}


def test_freeu_draws_diffusers_pixels_in_every_mode(tiny_sdxl_path, sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from deployments.engines import create_engine

    model = ModelConfig(id="a/b", embedded="tiny-sdxl", freeu={})
    engine = create_engine(model, tmp_path, None)
    assert engine.describe()["freeu"] == SDXL_VALUES
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_freeu(**SDXL_VALUES)
    ours = engine.generate([REQUEST])[0][0]
    theirs = pipe(prompt=REQUEST.prompt, width=64, height=64, num_inference_steps=3,
                  guidance_scale=6.0, generator=torch.Generator().manual_seed(4)).images[0]
    assert_same_pixels(ours, theirs)
    assert np.abs(_px(ours) - _px(sdxl.generate([REQUEST])[0][0])).mean() > 1
    picture = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    moved = replace(REQUEST, source=SourceImage(picture.tobytes(), 0.7))
    assert np.abs(_px(engine.generate([moved])[0][0])
                  - _px(sdxl.generate([moved])[0][0])).mean() > 1
    assert all(p.unet is engine.pipe.unet for p in engine._pipes.values())


def test_freeu_is_for_sdxl_and_its_scales_are_part_of_the_version(tmp_path):
    with pytest.raises(ConfigError, match="freeu: only sdxl models"):
        parse_config({"models": [{"id": "a/f", "family": "flux", "embedded": "tiny-flux",
                                  "freeu": {}}]})
    with pytest.raises(ConfigError, match=r"freeu\.b1"):
        parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl", "freeu": {"b1": 9}}]})
    ids = {version_id(ModelConfig(id="a/b", embedded="tiny-sdxl", freeu=freeu), tmp_path)
           for freeu in (None, {}, {"b2": 1.2})}
    assert len(ids) == 3
