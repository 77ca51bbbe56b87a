"""Reading SDXL prompts from an earlier text-encoder layer (`clip_skip`), on the tiny SDXL
(CPU): diffusers' `clip_skip` embeddings (for the negative prompt too) and the pixels they
draw, per request within one call,
held apart in the prompt cache, refused where the model has no such layer and on FLUX."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from serve.config import ConfigError, ModelConfig, parse_config
from serve.errors import InvalidField
from serve.types import GenerationRequest
from serve.versions import version_id
from tests.unit.test_engine import _px, assert_same_pixels

REQUEST = GenerationRequest(model="a/b", prompt="a red cube", width=64, height=64,
                            num_inference_steps=3, guidance_scale=6.0, seed=4,
                            scheduler="K_EULER", negative_prompt="blurry")


def _diffusers(engine, prompt: str, clip_skip: int | None) -> tuple:
    """diffusers' embeddings of `prompt` as a positive prompt, without guidance."""
    return engine.pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1,
                                     do_classifier_free_guidance=False, clip_skip=clip_skip)


def test_the_embeddings_are_diffusers_clip_skip_for_both_prompts(sdxl):
    """Skipping one layer reads hidden_states[-3] of both encoders, for the negative
    prompt too (diffusers' own pipelines read it from the penultimate layer whatever
    `clip_skip` says); the pooled embeddings stay the last layer's; an empty negative
    prompt is still zeros."""
    pos, neg, pooled, neg_pooled = sdxl._encode_prompt("a red cube", "blurry", 1)
    theirs, _, their_pooled, _ = _diffusers(sdxl, "a red cube", 1)
    negative, _, negative_pooled, _ = _diffusers(sdxl, "blurry", 1)
    assert torch.equal(pos, theirs) and torch.equal(pooled, their_pooled)
    assert torch.equal(neg, negative) and torch.equal(neg_pooled, negative_pooled)
    plain = sdxl._encode_prompt("a red cube", "blurry")
    assert torch.equal(plain[0], _diffusers(sdxl, "a red cube", None)[0])
    assert not torch.equal(plain[0], pos) and not torch.equal(plain[1], neg)
    assert torch.equal(plain[2], pooled) and torch.equal(plain[3], neg_pooled)
    _, zeros, _, zero_pooled = sdxl._encode_prompt("a red cube", "", 1)
    assert not zeros.any() and not zero_pooled.any()


def test_a_request_skipping_a_layer_draws_diffusers_pixels(sdxl, tiny_sdxl_path):
    """diffusers' pipeline given both prompts' embeddings read one layer back."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pos, _, pooled, _ = _diffusers(sdxl, "a red cube", 1)
    neg, _, neg_pooled, _ = _diffusers(sdxl, "blurry", 1)
    ours = sdxl.generate([replace(REQUEST, clip_skip=1)])[0][0]
    theirs = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=neg_pooled, width=64, height=64,
                  num_inference_steps=3, guidance_scale=6.0,
                  generator=torch.Generator().manual_seed(4)).images[0]
    assert_same_pixels(ours, theirs)
    assert np.abs(_px(ours) - _px(sdxl.generate([REQUEST])[0][0])).mean() > 1


def test_requests_reading_different_layers_share_a_call_and_keep_their_pixels(sdxl):
    skipped = replace(REQUEST, clip_skip=1, seed=5)
    assert sdxl.batch_key(skipped) == sdxl.batch_key(REQUEST)
    together = sdxl.generate([REQUEST, skipped])
    assert_same_pixels(together[0][0], sdxl.generate([REQUEST])[0][0])
    assert_same_pixels(together[1][0], sdxl.generate([skipped])[0][0])


def test_the_prompt_cache_holds_each_layer_apart(sdxl):
    first, held = sdxl.prompts.get(replace(REQUEST, prompt="a cache test", clip_skip=1))
    plain, plain_held = sdxl.prompts.get(replace(REQUEST, prompt="a cache test"))
    again, held_again = sdxl.prompts.get(replace(REQUEST, prompt="a cache test", clip_skip=1))
    assert (held, plain_held, held_again) == (False, False, True)
    assert again is first and not torch.equal(first[0], plain[0])


def test_a_layer_the_text_encoders_lack_is_refused_before_the_call(sdxl):
    """The tiny encoders have 2 layers: skipping 1 reads their token embeddings, 2 is
    past them. The refusal names the field; the model's default is checked at start."""
    assert sdxl.most_clip_skip == 1
    sdxl.check_request(replace(REQUEST, clip_skip=1))
    with pytest.raises(InvalidField, match="at most 1") as caught:
        sdxl.check_request(replace(REQUEST, clip_skip=2))
    assert caught.value.field == "clip_skip" and caught.value.status == 422


def test_a_default_past_the_encoders_fails_the_engine_at_start(tmp_path):
    from deployments.engines import create_engine

    model = ModelConfig(id="a/b", embedded="tiny-sdxl", prompts={"clip_skip": 2})
    with pytest.raises(ValueError, match=r"prompts\.clip_skip: at most 1"):
        create_engine(model, tmp_path, None)


def test_the_models_default_applies_unless_the_request_names_a_layer():
    model = ModelConfig(id="a/b", embedded="tiny-sdxl", prompts={"clip_skip": 1})
    assert GenerationRequest.for_model(model, "x").clip_skip == 1
    assert GenerationRequest.for_model(model, "x", clip_skip=0).clip_skip == 0
    plain = ModelConfig(id="a/b", embedded="tiny-sdxl")
    assert GenerationRequest.for_model(plain, "x").clip_skip == 0


def test_flux_refuses_a_layer_in_requests_and_in_its_config():
    flux = ModelConfig(id="a/f", embedded="tiny-flux", family="flux")
    with pytest.raises(InvalidField, match="no CLIP layer") as caught:
        GenerationRequest.for_model(flux, "x", clip_skip=1)
    assert caught.value.field == "clip_skip"
    assert GenerationRequest.for_model(flux, "x", clip_skip=0).clip_skip == 0
    with pytest.raises(ConfigError, match="prompts"):
        parse_config({"models": [{"id": "a/f", "embedded": "tiny-flux", "family": "flux",
                                  "prompts": {"clip_skip": 1}}]})


def test_a_default_layer_is_part_of_the_version_and_zero_leaves_it_as_it_was(tmp_path):
    ids = [version_id(ModelConfig(id="a/b", embedded="tiny-sdxl", prompts=p), tmp_path)
           for p in ({}, {"clip_skip": 0}, {"clip_skip": 1})]
    assert ids[0] == ids[1] != ids[2]
