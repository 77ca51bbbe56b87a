"""Mood boards: an image prompt of several pictures. An IP-Adapter reads them together, as
diffusers' pipelines do given a list of pictures for one adapter; FLUX.1 Redux appends
each one's tokens to the prompt's. On the tiny SDXL and FLUX engines with their embedded
tiny adapters and Redux, and a plus adapter beside the SDXL one (CPU): requests with
boards of different sizes, single pictures and none share a call and each gets
diffusers' own pixels; the routes read a board's pictures in order and name a bad one."""

import asyncio
import base64
import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from serve.errors import InvalidField
from serve.types import ImagePrompt, Picture
from tests.unit.test_engine import _px, assert_same_pixels
from tests.unit.test_image_prompts import (
    BASE,
    DOTS,
    FILES,
    STRIPES,
    _picture,
    _reference,
    _seeds,
    adapter_path,  # noqa: F401
    engine,  # noqa: F401
    plus_adapter,  # noqa: F401
)

RINGS = _picture(3, (36, 36))
ARGS = {"prompt": "a red cube", "width": 64, "height": 64, "num_inference_steps": 6,
        "guidance_scale": 7.5}


def _board(pictures, scale: float) -> ImagePrompt:
    first, *more = pictures
    return ImagePrompt(first.tobytes(), *first.size, scale,
                       more=tuple(Picture(p.tobytes(), *p.size) for p in more))


def test_boards_of_different_sizes_share_a_call_each_with_diffusers_pixels(
        engine, tiny_sdxl_path, adapter_path):  # noqa: F811
    """One call: a board of two pictures (two images), one picture, a board of three, and
    no image prompt. The call reads six pictures per row (each row's repeated); each image
    is what diffusers draws for its request alone."""
    boards = ([STRIPES, DOTS], [DOTS], [RINGS, STRIPES, DOTS])
    batch = [replace(BASE, image_prompt=_board(boards[0], 0.6), num_outputs=2),
             replace(BASE, seed=9, image_prompt=_board(boards[1], 0.3)),
             replace(BASE, seed=13, image_prompt=_board(boards[2], 0.8)),
             replace(BASE, seed=11)]
    assert len({engine.batch_key(r) for r in batch}) == 1
    ours = engine.generate(batch)
    pipe = _reference(tiny_sdxl_path, adapter_path)
    theirs = []
    for board, scale, seeds in zip(boards, (0.6, 0.3, 0.8), ((5, 6), (9,), (13,)), strict=True):
        pipe.set_ip_adapter_scale(scale)
        theirs += pipe(**ARGS, ip_adapter_image=[board], num_images_per_prompt=len(seeds),
                       generator=_seeds(*seeds)).images
    pipe.set_ip_adapter_scale(0.0)
    theirs += pipe(**ARGS, ip_adapter_image=DOTS, generator=_seeds(11)).images
    for a, b in zip([image for images in ours for image in images], theirs, strict=True):
        assert_same_pixels(a, b)
    # The board is not its first picture: the second one moves the image.
    first_alone = engine.generate([replace(BASE, image_prompt=_board([STRIPES], 0.6))])
    assert np.abs(_px(first_alone[0][0]) - _px(ours[0][0])).mean() > 0.3


def test_a_board_for_a_further_adapter_beside_one_picture_for_the_first(
        tiny_sdxl_path, plus_adapter):  # noqa: F811
    """The tiny adapter first (embeddings) and a plus one as "face" (hidden states): a
    two-picture board for the face with one picture for the first, and the face's one
    picture alone, in one call; each is diffusers' with both adapters loaded."""
    import diffusers

    from deployments.engines.sdxl import SDXLEngine
    from tests.ip_adapters import PLUS

    two = SDXLEngine(tiny_sdxl_path, "float32", "cpu",
                     ip_adapter=(plus_adapter, FILES[0], (("", FILES[1]), ("face", PLUS)),
                                 FILES[2]))
    batch = [replace(BASE, image_prompt=_board([STRIPES], 0.6),
                     extra_image_prompts=(("face", _board([DOTS, RINGS], 0.5)),)),
             replace(BASE, seed=7, extra_image_prompts=(("face", _board([DOTS], 0.8)),))]
    ours = two.generate(batch)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.load_ip_adapter([str(plus_adapter)] * 2, subfolder=[FILES[0]] * 2,
                         weight_name=[FILES[1], PLUS])
    pipe.set_progress_bar_config(disable=True)
    pipe.set_ip_adapter_scale([0.6, 0.5])
    first = pipe(**ARGS, ip_adapter_image=[STRIPES, [DOTS, RINGS]],
                 generator=_seeds(5)).images[0]
    pipe.set_ip_adapter_scale([0.0, 0.8])
    second = pipe(**ARGS, ip_adapter_image=[STRIPES, [DOTS]], generator=_seeds(7)).images[0]
    assert_same_pixels(ours[0][0], first)
    assert_same_pixels(ours[1][0], second)


def test_a_flux_board_is_diffusers_own(tiny_flux_path, cache_dir, flux):
    """XLabs' adapter on the tiny FLUX: a two-picture board beside one picture and none,
    in one call, each as diffusers' FluxPipeline draws it; the row without one is the
    plain model's, exactly."""
    from diffusers import FluxPipeline

    from deployments.engines.flux import FluxEngine
    from deployments.tiny import TINY_FLUX_IP_ADAPTER, ensure_embedded
    from tests.unit.test_flux_image_prompts import ARGS as FLUX_ARGS
    from tests.unit.test_flux_image_prompts import BASE as FLUX
    from tests.unit.test_flux_image_prompts import FILES as FLUX_FILES
    from tests.unit.test_flux_image_prompts import _reference as flux_reference

    path = ensure_embedded(TINY_FLUX_IP_ADAPTER, cache_dir)
    prompted = FluxEngine(tiny_flux_path, "float32", "cpu", ip_adapter=(path, *FLUX_FILES))
    batch = [replace(FLUX, image_prompt=_board([STRIPES, RINGS], 1.0)),
             replace(FLUX, seed=9, image_prompt=_board([DOTS], 1.0)),
             replace(FLUX, seed=11)]
    ours = prompted.generate(batch)
    pipe = flux_reference(FluxPipeline.from_pretrained(tiny_flux_path), path, 1.0)
    board = pipe(**FLUX_ARGS, ip_adapter_image=[[STRIPES, RINGS]], generator=_seeds(5))
    single = pipe(**FLUX_ARGS, ip_adapter_image=DOTS, generator=_seeds(9))
    for images, theirs in zip(ours, (board.images, single.images)):
        assert_same_pixels(images[0], theirs[0])
    assert np.array_equal(_px(ours[2][0]), _px(flux.generate([replace(FLUX, seed=11)])[0][0]))


def test_a_redux_board_appends_each_pictures_tokens_after_the_prompts(
        tiny_flux_path, cache_dir):
    """FLUX.1 Redux: a board's pictures' tokens follow the prompt's T5 tokens in order,
    each averaged down by the request's downsampling; a board of four pictures averaged
    down by 2 (4 x 16 tokens) shares a call with one picture at 1 (64 tokens), and each
    image is diffusers' FluxPipeline fed those tokens."""
    from diffusers import FluxPipeline

    from deployments.engines.flux import FluxEngine
    from deployments.tiny import TINY_FLUX_REDUX, ensure_embedded
    from tests.unit.test_redux import BASE as REDUX
    from tests.unit.test_redux import _reference_embeds

    path = ensure_embedded(TINY_FLUX_REDUX, cache_dir)
    reader = FluxEngine(tiny_flux_path, "float32", "cpu", redux=path)
    board = [STRIPES, DOTS, RINGS, _picture(7, (64, 64))]
    batch = [replace(REDUX, image_prompt=replace(_board(board, 1.0), downsampling=2)),
             replace(REDUX, seed=4, prompt="", image_prompt=_board([DOTS], 1.0))]
    assert len({reader.batch_key(r) for r in batch}) == 1
    assert reader.batch_key(replace(REDUX, image_prompt=replace(
        _board(board[:2], 1.0), downsampling=2))) != reader.batch_key(batch[0])
    ours = reader.generate(batch)
    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    pipe.set_progress_bar_config(disable=True)
    for request, pictures, pool, images in zip(batch, (board, [DOTS]), (2, 1), ours,
                                               strict=True):
        made = [_reference_embeds(pipe, path, request, p, pool) for p in pictures]
        text = made[0]["prompt_embeds"][:, :256]  # the tiny T5's 256 tokens, then the picture's
        embeds = torch.cat([text, *(m["prompt_embeds"][:, 256:] for m in made)], dim=1)
        theirs = pipe(prompt_embeds=embeds, pooled_prompt_embeds=made[0]["pooled_prompt_embeds"],
                      width=request.width, height=request.height,
                      num_inference_steps=request.num_inference_steps,
                      guidance_scale=request.guidance_scale,
                      generator=_seeds(request.seed)).images[0]
        assert_same_pixels(images[0], theirs)


def test_a_boards_pictures_are_each_encoded_once(tiny_sdxl_path, adapter_path):  # noqa: F811
    """A board's embedding is its pictures' in order; a picture seen before, alone or on
    another board, is not encoded again."""
    from diffusers import StableDiffusionXLPipeline

    from deployments.engines.image_prompts import ImagePrompts

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    prompts = ImagePrompts(pipe, adapter_path, *FILES)
    encoded = []
    pipe.image_encoder.register_forward_hook(lambda *a: encoded.append(1))
    stripes, dots = (prompts.embed(_board([p], 0.6)) for p in (STRIPES, DOTS))
    board = prompts.embed(_board([DOTS, RINGS, STRIPES], 0.6))
    assert board.shape[0] == 3 and len(encoded) == 3
    assert torch.equal(board[0], dots[0]) and torch.equal(board[2], stripes[0])
    assert not torch.equal(board[1], board[0])


def _text(picture: Image.Image) -> str:
    data = io.BytesIO()
    picture.save(data, "PNG")
    return base64.b64encode(data.getvalue()).decode()


def test_the_routes_read_a_boards_pictures_in_order_and_name_a_bad_one():
    from pydantic import ValidationError

    from serve.config import default_config
    from serve.controls import ImagePromptParams, load_image_prompt
    from serve.images import ImageFetcher
    from serve.routes.generate_params import GenerateParams
    from serve.routes.openai_params import ImageEditParams

    model, fetcher = default_config().models[0], ImageFetcher([], None, None)
    big = _picture(4, (1024, 768))
    given = ImagePromptParams([_text(DOTS), _text(big), _text(RINGS)], 0.9)
    prompt = asyncio.run(load_image_prompt(given, model, fetcher))
    assert (prompt.rgb, prompt.width, prompt.height, prompt.scale) == (
        DOTS.tobytes(), 30, 50, 0.9)
    assert [(p.width, p.height) for p in prompt.pictures] == [(30, 50), (683, 512), (36, 36)]
    assert prompt.pictures[2].rgb == RINGS.tobytes()
    with pytest.raises(InvalidField) as refused:
        asyncio.run(load_image_prompt(ImagePromptParams([_text(DOTS), "not an image"]),
                                      model, fetcher))
    assert refused.value.field == "ip_adapter_image.1"
    with pytest.raises(ValidationError) as refused:
        GenerateParams.model_validate({"prompt": "x", "ip_adapter_image": ["a"] * 5})
    assert refused.value.errors()[0]["loc"] == ("ip_adapter_image",)
    assert "send 1 to 4 pictures, not 5" in refused.value.errors()[0]["msg"]
    # An edit's form carries a board as JSON text; one picture stays as it is sent.
    form = ImageEditParams.model_validate({"prompt": "x", "ip_adapter_image": '["a", "b"]'})
    assert form.ip_adapter_image == ["a", "b"]
    assert ImageEditParams.model_validate({"prompt": "x", "ip_adapter_image": "abc"}
                                          ).ip_adapter_image == "abc"
