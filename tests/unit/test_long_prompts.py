"""Long prompts and weighted words on SDXL (`prompts`), on the tiny SDXL (CPU). Each chunk
of a long prompt is diffusers' encoding of those 75 tokens; a one-chunk prompt is
diffusers' encoding exactly; weights follow AUTOMATIC1111's emphasis."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from deployments.engines.long_prompts import LongPrompts, weighted_pieces
from deployments.engines.refiner import refiner_embeds
from serve.config import ConfigError, ModelConfig, parse_config
from serve.types import GenerationRequest
from serve.versions import version_id
from tests.unit.test_engine import _px, assert_same_pixels

# In the tiny tokenizer, "the" and "on" are one token each: the prompt's tokens are its words.
WORDS = ["the"] * 80 + ["on"] * 40
LONG = " ".join(WORDS)
REQUEST = GenerationRequest(model="a/b", prompt=LONG, width=64, height=64,
                            num_inference_steps=3, guidance_scale=6.0, seed=4,
                            scheduler="K_EULER")


@pytest.fixture(scope="module")
def refiner_path(cache_dir):
    from deployments.tiny import TINY_SDXL_REFINER, ensure_embedded

    return ensure_embedded(TINY_SDXL_REFINER, cache_dir)


@pytest.fixture(scope="module")
def chunked(tiny_sdxl_path, refiner_path):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float32", "cpu", refiner=refiner_path,
                      prompts={"chunks": 3, "weights": True})


def _diffusers(engine, prompt: str, negative: str | None = None) -> tuple:
    return engine.pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1,
                                     do_classifier_free_guidance=True,
                                     negative_prompt=negative)


@pytest.mark.parametrize(("prompt", "pieces"), [
    ("a (red:1.5) cube", [("a ", 1.0), ("red", 1.5), (" cube", 1.0)]),
    ("((red)) cube", [("red", 1.1 * 1.1), (" cube", 1.0)]),
    ("[blue] sky", [("blue", 1 / 1.1), (" sky", 1.0)]),
    ("(a (b:2) c)", [("a ", 1.1), ("b", 2.2), (" c", 1.1)]),
    (r"\(literal\) [x:2]", [("(literal) ", 1.0), ("x:2", 1 / 1.1)]),
    ("(open to the end", [("open to the end", 1.1)]),
    ("closed) only: (b:0.5)", [("closed) only: ", 1.0), ("b", 0.5)]),
    ("(red:1) cube", [("red cube", 1.0)]),
    ("", [("", 1.0)]),
])
def test_the_emphasis_syntax_weighs_each_piece(prompt, pieces):
    got = weighted_pieces(prompt)
    assert [text for text, _ in got] == [text for text, _ in pieces]
    assert [w for _, w in got] == pytest.approx([w for _, w in pieces])


def test_a_prompt_of_one_chunk_is_encoded_as_diffusers_encodes_it(sdxl, chunked):
    """With or without a negative prompt (zeros for none, as the model says), with the
    long reading on or off; a longer prompt read in one chunk is diffusers' cut one."""
    for engine in (sdxl, chunked):
        for negative in ("", "blurry"):
            ours = engine._encode_prompt("a red cube", negative)
            theirs = _diffusers(engine, "a red cube", negative or None)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    ours, theirs = sdxl._encode_prompt(LONG, ""), _diffusers(sdxl, LONG)
    assert ours[0].shape[1] == 77 and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_a_long_prompt_is_read_in_chunks_of_75_tokens(chunked):
    """120 tokens: two chunks, each diffusers' encoding of its own 75 (or 45) tokens, the
    pooled embedding the first chunk's; the negative prompt is padded with an empty chunk
    (zeros when it is empty)."""
    pos, neg, pooled, neg_pooled = chunked._encode_prompt(LONG, "")
    assert chunked.long_prompts.count(LONG, "") == 2 and pos.shape == (1, 154, pos.shape[2])
    first, _, first_pooled, _ = _diffusers(chunked, " ".join(WORDS[:75]))
    second = _diffusers(chunked, " ".join(WORDS[75:]))[0]
    torch.testing.assert_close(pos[:, :77], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pos[:, 77:], second, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, first_pooled, rtol=1e-5, atol=1e-5)
    assert not neg.any() and not neg_pooled.any() and neg.shape == pos.shape
    _, neg, _, neg_pooled = chunked._encode_prompt(LONG, "blurry")
    blurry, _, blurry_pooled, _ = _diffusers(chunked, "blurry")
    torch.testing.assert_close(neg[:, :77], blurry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(neg_pooled, blurry_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(neg[:, 77:], _diffusers(chunked, "")[0], rtol=1e-5, atol=1e-5)
    many = " ".join(["the"] * 400)  # cut after the third chunk
    assert chunked._encode_prompt(many, "")[0].shape[1] == 3 * 77
    assert chunked.long_prompts.count(many, "") == 3


def test_break_starts_the_next_chunk(chunked):
    """`BREAK` ends a chunk early: each side is diffusers' encoding of its words alone."""
    pos = chunked._encode_prompt("a (red:1) cube BREAK the sea", "")[0]
    assert chunked.long_prompts.count("a red cube BREAK the sea", "") == 2
    torch.testing.assert_close(pos[:, :77], _diffusers(chunked, "a red cube")[0],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pos[:, 77:], _diffusers(chunked, "the sea")[0],
                               rtol=1e-5, atol=1e-5)


def test_a_chunk_ends_after_a_comma_near_its_end(chunked):
    """As the WebUI splits prompts: the 75th token is not the last of a phrase, so the
    chunk ends after the comma 5 tokens before it, and the words after the comma start
    the second chunk; each chunk is diffusers' encoding of its own words."""
    words = ["the"] * 70 + [","] + ["on"] * 20
    pos = chunked._encode_prompt(" ".join(words), "")[0]
    torch.testing.assert_close(pos[:, :77], _diffusers(chunked, " ".join(words[:71]))[0],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pos[:, 77:], _diffusers(chunked, " ".join(words[71:]))[0],
                               rtol=1e-5, atol=1e-5)
    tokenizer, comma = chunked.long_prompts.tokenizers[0], 300  # the tiny tokenizer's ","

    def lengths(text: str, backtrack: int) -> list[tuple[int, int]]:
        reader = LongPrompts([tokenizer], chunks=3, comma_backtrack=backtrack)
        return [(len(ids), ids.count(comma)) for ids, _ in reader._tokens(tokenizer, text)]

    text = " ".join(words)
    assert lengths(text, 20) == [(71, 1), (20, 0)]
    assert lengths(text, 5) == [(71, 1), (20, 0)] and lengths(text, 4) == [(75, 1), (16, 0)]
    assert lengths(text, 0) == [(75, 1), (16, 0)]
    # A comma right after a full chunk starts the next one; one chunk read: diffusers' cut.
    assert lengths(" ".join(["the"] * 75 + [","] + ["on"] * 5), 20) == [(75, 0), (6, 1)]
    single = LongPrompts([tokenizer], chunks=1)
    assert [len(ids) for ids, _ in single._tokens(tokenizer, text)] == [75]


def test_a_prompt_cut_short_is_noted_for_the_client(sdxl, chunked):
    request = replace(REQUEST, negative_prompt=" ".join(["on"] * 300))
    cut = "{}: the model reads {} of its {} tokens ({} chunk(s) of 75); the rest was not read"
    assert sdxl.prepare(request)[0].notes == (cut.format("prompt", 75, 120, 1),
                                              cut.format("negative_prompt", 75, 300, 1))
    assert chunked.prepare(request)[0].notes == (cut.format("negative_prompt", 225, 300, 3),)
    assert chunked.prepare(REQUEST)[0].notes == () == sdxl.prepare(
        replace(REQUEST, prompt="a red cube"))[0].notes


def test_words_past_77_tokens_change_the_image_only_when_read(sdxl, chunked):
    changed = replace(REQUEST, prompt=" ".join(WORDS[:100] + ["the"] * 20))
    assert_same_pixels(sdxl.generate([REQUEST])[0][0], sdxl.generate([changed])[0][0])
    ours, other = chunked.generate([REQUEST])[0][0], chunked.generate([changed])[0][0]
    assert np.abs(_px(ours) - _px(other)).mean() > 1
    short = replace(REQUEST, prompt="a red cube")  # one chunk: diffusers' image
    assert_same_pixels(chunked.generate([short])[0][0], sdxl.generate([short])[0][0])


def test_requests_of_equal_chunk_counts_share_calls(chunked):
    """Equal counts share a call, with each request's image as alone (other counts do
    too, their padding masked: `tests/unit/test_prompt_masks.py`)."""
    other = replace(REQUEST, prompt=" ".join(WORDS[::-1]), seed=9)
    both = chunked.generate([REQUEST, other])
    assert np.abs(_px(both[0][0]) - _px(chunked.generate([REQUEST])[0][0])).max() <= 1
    assert np.abs(_px(both[1][0]) - _px(chunked.generate([other])[0][0])).max() <= 1


def test_weights_scale_token_embeddings_then_restore_the_chunk_mean(sdxl, chunked):
    """AUTOMATIC1111's emphasis on each encoder's states, applied to diffusers' encoding of
    the unweighted prompt; the pooled embedding is unweighted; `\\(` is a bracket."""
    pipe = chunked.pipe
    pos, _, pooled, _ = chunked._encode_prompt("a (red:1.5) cube", "")
    plain, _, plain_pooled, _ = _diffusers(chunked, "a red cube")
    assert torch.equal(pooled, plain_pooled)
    red = len(pipe.tokenizer("a ", add_special_tokens=False).input_ids)
    reds = len(pipe.tokenizer("red", add_special_tokens=False).input_ids)
    weights = torch.ones(77)
    weights[1 + red:1 + red + reds] = 1.5
    split = pipe.text_encoder.config.hidden_size
    for part in (slice(0, split), slice(split, None)):
        z = plain[..., part]
        expected = z * weights[None, :, None]
        expected = expected * (z.mean() / expected.mean())
        torch.testing.assert_close(pos[..., part], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pos, plain)
    literal = chunked._encode_prompt(r"a \(red\) cube", "")
    assert all(torch.equal(a, b) for a, b in zip(literal, sdxl._encode_prompt("a (red) cube", "")))
    request = replace(REQUEST, prompt="a (red cube:4)")
    plain_image = sdxl.generate([replace(request, prompt="a red cube")])[0][0]
    assert np.abs(_px(chunked.generate([request])[0][0]) - _px(plain_image)).mean() > 1


def test_the_refiner_reads_prompts_in_as_many_chunks(chunked):
    embeds = refiner_embeds(chunked.refiner, chunked.long_prompts,
                            [(LONG, ""), (" ".join(WORDS[::-1]), "blurry")])
    assert embeds["prompt_embeds"].shape[:2] == (2, 154)
    refiner = chunked.refiner
    first = refiner.encode_prompt(prompt=" ".join(WORDS[:75]), device="cpu",
                                  negative_prompt="")
    torch.testing.assert_close(embeds["prompt_embeds"][:1, :77], first[0], rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(embeds["negative_prompt_embeds"][:1, :77], first[1],
                               rtol=1e-5, atol=1e-5)
    refined = replace(REQUEST, refine="expert_ensemble_refiner", high_noise_frac=0.5)
    (image,), = chunked.generate([refined])
    assert image.size == (64, 64) and _px(image).std() > 1


def test_a_compiled_engine_runs_long_prompts_uncompiled(tiny_sdxl_path, chunked, compile_cache):
    """Compiled for exact shapes, a call of several chunks compiles nothing under load."""
    from torch._dynamo.utils import counters

    from deployments.engines.sdxl import SDXLEngine
    from serve.config import SpeedConfig

    compiled = SDXLEngine(tiny_sdxl_path, "float32", "cpu", compile_cache=compile_cache,
                          speed=SpeedConfig(compile=True, batch_buckets=[1]),
                          prompts={"chunks": 3, "weights": True})
    compiled.warm_up(replace(REQUEST, prompt="warm-up", num_inference_steps=1))
    warmed = counters["stats"]["calls_captured"]
    (image,), = compiled.generate([REQUEST])
    assert counters["stats"]["calls_captured"] == warmed
    assert np.abs(_px(image) - _px(chunked.generate([REQUEST])[0][0])).max() <= 2


def test_prompts_are_for_sdxl_and_part_of_the_version(tmp_path):
    with pytest.raises(ConfigError, match="prompts: FLUX's T5"):
        parse_config({"models": [{"id": "a/f", "family": "flux", "embedded": "tiny-flux",
                                  "prompts": {"chunks": 2}}]})
    with pytest.raises(ConfigError, match=r"prompts\.chunks"):
        parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl",
                                  "prompts": {"chunks": 9}}]})
    with pytest.raises(ConfigError, match=r"prompts\.comma_backtrack"):
        parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl",
                                  "prompts": {"chunks": 2, "comma_backtrack": 75}}]})
    flux = parse_config({"models": [{"id": "a/f", "family": "flux", "embedded": "tiny-flux",
                                     "prompts": {"chunks": 1}}]})
    assert flux.models[0].prompts.given() == {}
    ids = [version_id(ModelConfig(id="a/b", embedded="tiny-sdxl", prompts=p), tmp_path)
           for p in ({}, {"chunks": 1, "weights": False, "comma_backtrack": 20},
                     {"chunks": 2}, {"weights": True}, {"chunks": 2, "comma_backtrack": 0})]
    assert ids[0] == ids[1] and len(set(ids)) == 4
