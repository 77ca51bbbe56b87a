"""An IP-Adapter steering only some of the UNet's attention blocks (InstantStyle's style
and layout blocks), per request, on the tiny SDXL's engine with the embedded tiny adapter
(CPU): the blocks are InstantStyle's on SDXL's architecture; requests steering every
block, the style block, the layout block and both share a call, each with the pixels of
diffusers' pipeline given the same blocks through `set_ip_adapter_scale`; the routes
take the field and FLUX models refuse it, naming it."""

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import torch

from serve.errors import InvalidField
from serve.types import ImagePrompt
from tests.unit.test_engine import _px, assert_same_pixels
from tests.unit.test_image_prompts import (
    BASE,
    DOTS,
    STRIPES,
    _reference,
    _seeds,
    adapter_path,  # noqa: F401
    engine,  # noqa: F401
)
from tests.unit.test_mood_boards import ARGS, _text


def _steering(picture, blocks: str, scale: float = 1.0, **overrides):
    return replace(BASE, image_prompt=ImagePrompt(picture.tobytes(), *picture.size, scale,
                                                  blocks=blocks), **overrides)


def test_the_blocks_are_instantstyles_on_sdxls_architecture(engine):  # noqa: F811
    from diffusers import UNet2DConditionModel

    from deployments.engines.image_prompt_rows import block_kinds

    # SDXL base's block layout (its channels shrunk; nothing is computed).
    with torch.device("meta"):
        sdxl = UNet2DConditionModel(
            block_out_channels=(32, 64, 128), layers_per_block=2, cross_attention_dim=64,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8))
    assert block_kinds(sdxl) == {"up_blocks.0.attentions.1.": "style",
                                 "down_blocks.2.attentions.1.": "layout"}
    # The tiny model has one down block with attention, with one of them.
    assert block_kinds(engine.pipe.unet) == {"up_blocks.0.attentions.1.": "style",
                                             "down_blocks.1.attentions.0.": "layout"}


def test_requests_steering_different_blocks_share_a_call_with_diffusers_pixels(
        engine, tiny_sdxl_path, adapter_path):  # noqa: F811
    """One call: every block at 0.8, the style block at 1.5 (two images), the layout block
    at 1.2 and both at 1.0; each is what diffusers draws with its blocks' scales set by
    set_ip_adapter_scale's dict (the other blocks at 0)."""
    batch = [_steering(STRIPES, "all", 0.8), _steering(DOTS, "style", 1.5, num_outputs=2,
                                                          seed=7),
             _steering(STRIPES, "layout", 1.2, seed=9),
             _steering(DOTS, "style_and_layout", seed=11)]
    assert len({engine.batch_key(r) for r in batch}) == 1
    ours = engine.generate(batch)
    pipe = _reference(tiny_sdxl_path, adapter_path)
    configs = [0.8, {"up": {"block_0": [0.0, 1.5]}}, {"down": {"block_1": [1.2]}},
               {"up": {"block_0": [0.0, 1.0]}, "down": {"block_1": [1.0]}}]
    for request, config, images in zip(batch, configs, ours, strict=True):
        pipe.set_ip_adapter_scale(config)
        picture = STRIPES if request.image_prompt.rgb == STRIPES.tobytes() else DOTS
        theirs = pipe(**ARGS, ip_adapter_image=picture, num_images_per_prompt=len(images),
                      generator=_seeds(*request.seeds)).images
        for a, b in zip(images, theirs, strict=True):
            assert_same_pixels(a, b)
    # The style block alone moves the image less than every block at the same scale.
    plain = engine.generate([BASE])[0][0]
    every, style = (engine.generate([_steering(STRIPES, blocks, 1.5)])[0][0]
                    for blocks in ("all", "style"))
    gap = np.abs(_px(style) - _px(plain)).mean()
    assert 0 < gap < np.abs(_px(every) - _px(plain)).mean()


def test_the_routes_take_blocks_and_flux_models_refuse_them():
    from pydantic import ValidationError

    from serve.config import default_config
    from serve.controls import ImagePromptParams, image_prompt_params, load_image_prompt
    from serve.images import ImageFetcher
    from serve.routes.generate_params import GenerateParams

    sdxl, flux = default_config().models[:2]
    fetcher = ImageFetcher([], None, None)
    params = GenerateParams.model_validate({"prompt": "x", "ip_adapter_image": _text(DOTS),
                                            "ip_adapter_blocks": "style"})
    prompt = asyncio.run(load_image_prompt(image_prompt_params(params), sdxl, fetcher))
    assert prompt.blocks == "style" and prompt.rgb == DOTS.tobytes()
    with pytest.raises(InvalidField) as refused:
        asyncio.run(load_image_prompt(ImagePromptParams(_text(DOTS), None, "redux_image",
                                                        blocks="layout"), flux, fetcher))
    assert refused.value.field == "ip_adapter_blocks"
    with pytest.raises(ValidationError) as refused:
        GenerateParams.model_validate({"prompt": "x", "ip_adapter_blocks": "content"})
    assert refused.value.errors()[0]["loc"] == ("ip_adapter_blocks",)
