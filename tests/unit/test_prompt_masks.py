"""Requests whose prompts take different chunk counts share SDXL calls (`prompts.chunks`;
tiny SDXL, CPU): the shorter ones' embeddings padded and masked out of the UNet's
cross-attention, each image is its own call's, through withdrawals, the hires pass, the
refiner, img2img and image prompts; calls with ControlNets keep the counts apart."""

import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from deployments.engines.prompt_masks import padded, padding_masked
from deployments.engines.withdrawal import BatchRows
from serve.types import ControlImage
from tests.unit.test_engine import _px, assert_each_as_alone, assert_same_pixels, withdrawing
from tests.unit.test_image_prompts import FILES, _picture, adapter_path  # noqa: F401
from tests.unit.test_img2img import A
from tests.unit.test_img2img import _req as _source_req
from tests.unit.test_long_prompts import LONG, REQUEST, WORDS, refiner_path  # noqa: F401

SHORT = replace(REQUEST, prompt="a red cube", seed=5)
LONGER = replace(REQUEST, prompt=" ".join(WORDS * 2), seed=6, negative_prompt="blurry")


@pytest.fixture(scope="module")
def engine(tiny_sdxl_path, refiner_path, adapter_path):  # noqa: F811
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float32", "cpu", refiner=refiner_path,
                      ip_adapter=(adapter_path, *FILES), prompts={"chunks": 3})


def _masks(engine, batch, **kwargs):
    """The call's images, and the rows and tokens kept of each UNet call's mask (None
    for a call without one)."""
    seen = []

    def hook(module, args, kw, out):
        mask = kw.get("encoder_attention_mask")
        seen.append(None if mask is None else mask.sum(1).tolist())

    handle = engine.pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        return engine.generate(batch, **kwargs), seen
    finally:
        handle.remove()


def test_prompts_of_one_two_and_three_chunks_share_a_call_each_reading_its_own(engine,
                                                                              monkeypatch):
    counts = [engine.long_prompts.count(r.prompt, r.negative_prompt)
              for r in (SHORT, REQUEST, LONGER)]
    assert counts == [1, 2, 3]
    assert len({engine.batch_key(r) for r in (SHORT, REQUEST, LONGER)}) == 1
    batch = [SHORT, replace(REQUEST, num_outputs=2), LONGER]
    together, masks = _masks(engine, batch)
    # Both guidance halves: the short image's 77 tokens, the long one's 154 twice, 231.
    assert masks == [[77, 154, 154, 231] * 2] * 3
    assert_each_as_alone(engine, batch, together)
    # The mask matters: without it the short prompt's image reads the padding.
    monkeypatch.setattr("deployments.engines.sdxl.padding_masked",
                        lambda *args: contextlib.nullcontext())
    unmasked = engine.generate(batch)
    assert np.abs(_px(unmasked[0][0]) - _px(together[0][0])).mean() > 0.5


def test_prompts_of_one_count_run_without_a_mask(engine):
    _, masks = _masks(engine, [REQUEST, replace(REQUEST, seed=9, prompt=LONG + " again")])
    assert masks == [None] * 3


def test_a_withdrawn_request_leaves_and_the_others_keep_their_own_tokens(engine):
    batch = [SHORT, LONGER, replace(REQUEST, seed=7)]
    out, rows = withdrawing(engine, batch, 1, engine.pipe.unet,
                            lambda args, kwargs: kwargs["encoder_attention_mask"].sum(1).tolist())
    assert [len(images) for images in out] == [1, 0, 1]
    assert rows[0] == [77, 231, 154] * 2 and rows[-1] == [77, 154] * 2
    assert_same_pixels(out[0][0], engine.generate([batch[0]])[0][0])
    assert_same_pixels(out[2][0], engine.generate([batch[2]])[0][0])


@pytest.mark.parametrize("extra", [
    {"hires_scale": 1.5, "hires_strength": 0.5},
    {"refine": "expert_ensemble_refiner", "high_noise_frac": 0.5},
    {"refine": "base_image_refiner", "refine_steps": 10},
], ids=["hires", "ensemble", "refined"])
def test_the_hires_pass_and_the_refiner_read_each_rows_own_tokens(engine, extra):
    batch = [replace(SHORT, **extra), replace(LONGER, **extra)]
    assert engine.batch_key(batch[0]) == engine.batch_key(batch[1])
    assert_each_as_alone(engine, batch, engine.generate(batch))


def test_img2img_and_image_prompts_read_each_rows_own_tokens(engine):
    img2img = [_source_req(A, 0.7, None, prompt=SHORT.prompt),
               _source_req(A, 0.7, None, prompt=LONGER.prompt, seed=8)]
    assert_each_as_alone(engine, img2img, engine.generate(img2img))
    from serve.types import ImagePrompt

    picture = _picture(3)
    prompt = ImagePrompt(picture.tobytes(), *picture.size, 0.6)
    prompted = [replace(SHORT, image_prompt=prompt), replace(LONGER, image_prompt=prompt)]
    assert_each_as_alone(engine, prompted, engine.generate(prompted))


def test_calls_with_controlnets_keep_chunk_counts_apart(engine):
    control = (ControlImage("canny", b"\0" * 64 * 64 * 3, 1.0),)
    keys = {engine.batch_key(replace(r, controls=control)) for r in (SHORT, REQUEST)}
    assert len(keys) == 2


def test_padding_is_zeros_and_the_mask_follows_the_live_rows():
    short = (torch.ones(1, 77, 4), torch.ones(1, 77, 4), torch.ones(1, 8))
    long = (torch.ones(1, 154, 4), torch.ones(1, 154, 4), torch.ones(1, 8))
    (a, b, pooled), same = padded([short, long])
    assert a.shape == b.shape == (1, 154, 4) and torch.equal(pooled, short[2])
    assert a[:, :77].eq(1).all() and a[:, 77:].eq(0).all() and same[0] is long[0]
    rows, got = BatchRows([1, 2]), []
    net = torch.nn.Module()
    net.forward = lambda sample, t, encoder_hidden_states, encoder_attention_mask=None: \
        got.append(encoder_attention_mask)
    with padding_masked([net], [77, 154], rows):
        net(None, 0, encoder_hidden_states=torch.zeros(6, 154, 4))
        rows.drop({0})
        net(None, 0, encoder_hidden_states=torch.zeros(2, 154, 4))
        with pytest.raises(ValueError, match="3 prompt rows for 2 images"):
            net(None, 0, encoder_hidden_states=torch.zeros(3, 154, 4))
    assert got[0].sum(1).tolist() == [77, 154, 154] * 2 and got[1] is None
