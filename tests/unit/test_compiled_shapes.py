"""Compiled for exact shapes (`speed.compile` with `speed.batch_buckets`), a warmed-up
engine compiles nothing under load: on the tiny SDXL with an IP-Adapter, a ControlNet and
LoRA slots (CPU), calls of every bucket with an image prompt or a ControlNet, with or
without LoRA adapters, run the code the warm-up compiled for them, and calls of shapes the warm-up never met (a mood board, a
mask, another size) run uncompiled where their shapes differ, with the eager engine's
pixels."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from serve.adapters import AdapterCatalog, AdapterSet
from serve.types import ControlImage, ImagePrompt, Picture
from tests.compiled import compiled_run
from tests.unit.test_engine import _px
from tests.unit.test_image_prompts import (
    BASE,
    DOTS,
    FILES,
    STRIPES,
    adapter_path,  # noqa: F401
    engine,  # noqa: F401
)

STEPS = 2


def _prompt(*pictures, **extra) -> ImagePrompt:
    first, *more = pictures
    return ImagePrompt(first.tobytes(), *first.size, 0.6,
                       more=tuple(Picture(p.tobytes(), *p.size) for p in more), **extra)


@pytest.fixture(scope="module")
def compiled(tiny_sdxl_path, adapter_path, cache_dir, compile_cache):  # noqa: F811
    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import (
        TINY_SDXL_CONTROLNET,
        TINY_SDXL_DEMO,
        ensure_demo_loras,
        ensure_embedded,
    )
    from serve.config import SpeedConfig

    # Compiled code serves every instance of a block's class: forget what other tests'
    # engines compiled, so that only this engine's warm-up counts.
    torch._dynamo.reset()
    net = ensure_embedded(TINY_SDXL_CONTROLNET, cache_dir)
    catalog = AdapterCatalog.scan([(ensure_demo_loras(TINY_SDXL_DEMO, cache_dir), "sdxl",
                                    1.0)]).entries
    fast = SDXLEngine(tiny_sdxl_path, "float32", "cpu", controlnets={"canny": (net, None)},
                      ip_adapter=(adapter_path, *FILES), adapters=catalog, max_adapters=2,
                      max_lora_rank=8,
                      speed=SpeedConfig(compile=True, batch_buckets=[1, 2]),
                      compile_cache=compile_cache)
    fast.warm_up(replace(BASE, prompt="warm-up", num_inference_steps=1), max_images=2)
    return fast


def test_each_bucket_runs_compiled_with_an_image_prompt_or_a_controlnet(compiled):
    """The warm-up ran each bucket (1 and 2 images) with an image prompt and with the
    ControlNet too, without adapters and with the slots primed: such calls, a LoRA
    adapter or not, enter as many compiled regions as plain ones of their bucket (every
    block compiled, each step) and compile nothing."""
    base = replace(BASE, num_inference_steps=STEPS)
    _, plain, captured = compiled_run(lambda: compiled.generate([base, replace(base, seed=6)]))
    blocks = plain // STEPS
    assert captured == 0 and blocks > 0
    prompted = [replace(base, image_prompt=_prompt(STRIPES)),
                replace(base, seed=6, image_prompt=_prompt(DOTS))]
    styled = AdapterSet.of([("pixel-art", 1.0)])
    for batch in (prompted, prompted[:1], [replace(r, adapters=styled) for r in prompted]):
        _, regions, captured = compiled_run(lambda b=batch: compiled.generate(b))
        assert (regions, captured) == (blocks * STEPS, 0)
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[20:44, 20:44] = 255
    steered = replace(base, controls=(ControlImage("canny", edges.tobytes()),))
    for batch in ([steered, replace(steered, seed=6)], [replace(steered, adapters=styled)]):
        _, regions, captured = compiled_run(lambda b=batch: compiled.generate(b))
        assert captured == 0 and regions >= blocks * STEPS  # the ControlNet's blocks besides


def test_shapes_never_warmed_up_run_uncompiled_with_the_eager_pixels(compiled, engine):  # noqa: F811
    """A mood board (more image tokens in each cross-attention) and a mask (another
    attention) run uncompiled in the blocks they change and compiled in the others; a
    size not compiled runs uncompiled throughout. None compiles anything, and each gives
    the eager engine's pixels within two levels."""
    base = replace(BASE, num_inference_steps=STEPS)
    _, plain, _ = compiled_run(lambda: compiled.generate([base]))
    white = Picture(bytes([255]) * 32 * 32, 32, 32)
    board = replace(base, image_prompt=_prompt(STRIPES, DOTS))
    masked = replace(base, image_prompt=_prompt(STRIPES, mask=white))
    for request, some in ((board, True), (masked, True), (replace(base, width=96), False)):
        (images,), regions, captured = compiled_run(lambda r=request: compiled.generate([r]))
        assert captured == 0
        assert 0 < regions < plain if some else regions == 0
        (eager,) = engine.generate([request])
        assert np.abs(_px(images[0]) - _px(eager[0])).max() <= 2
