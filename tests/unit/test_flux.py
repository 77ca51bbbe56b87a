"""The FLUX family on the embedded tiny FLUX (CPU): the model is built from configs with
random weights, saved in diffusers format and loaded by `FluxPipeline.from_pretrained`;
the engine keeps the per-seed guarantees of the SDXL engine, and img2img follows
prompt_strength. The tiny VAE does not reproduce its input (random weights), so img2img
is judged by how much the output still depends on the input (see test_img2img)."""

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from serve.config import FAMILIES, LimitsConfig
from serve.errors import InvalidField
from serve.types import GenerationRequest, SourceImage

BASE = GenerationRequest(model="a/flux", prompt="a red shoe on a table", width=128,
                         height=96, num_inference_steps=8, guidance_scale=3.5, seed=11,
                         scheduler="FlowMatchEuler")
RNG = np.random.default_rng(1)
A = RNG.integers(0, 256, (96, 128, 3), dtype=np.uint8)
B = 255 - A


@pytest.fixture(scope="module")
def engine(tiny_flux_path):
    from deployments.engines.flux import FluxEngine

    return FluxEngine(tiny_flux_path, "float32", "cpu")


def _px(image):
    return np.asarray(image).astype(int)


def _img2img(pixels, strength, **overrides):
    return replace(BASE, source=SourceImage(Image.fromarray(pixels).tobytes(), strength),
                   **overrides)


def test_tiny_flux_is_saved_in_the_real_layout_with_generated_tokenizers(tiny_flux_path):
    index = json.loads((tiny_flux_path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert (tiny_flux_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_flux_path / "tokenizer_2" / "tokenizer.json").is_file()
    vae = json.loads((tiny_flux_path / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and len(vae["block_out_channels"]) == 4


def test_prompts_are_read_by_both_tokenizers(engine):
    t5 = engine.pipe.tokenizer_2("a photo of a shoe").input_ids
    clip = engine.pipe.tokenizer("a photo of a shoe").input_ids
    assert t5[-1] == engine.pipe.tokenizer_2.eos_token_id and len(t5) > 5
    assert len(clip) > 5 and engine.max_sequence_length == 256


def test_a_seed_gives_the_same_image_alone_or_batched_and_seeds_differ(engine):
    alone = engine.generate([BASE])[0][0]
    assert alone.size == (128, 96)
    batched = engine.generate([replace(BASE, seed=40, prompt="a blue hat", num_outputs=2),
                               BASE])
    diff = np.abs(_px(batched[1][0]) - _px(alone))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.abs(_px(batched[0][0]) - _px(alone)).mean() > 1
    assert np.abs(_px(batched[0][0]) - _px(batched[0][1])).mean() > 1


def test_guidance_changes_the_image(engine):
    low, high = (engine.generate([replace(BASE, guidance_scale=g)])[0][0] for g in (1.0, 8.0))
    assert np.abs(_px(low) - _px(high)).mean() > 0.5


def _close(a, b) -> bool:
    diff = np.abs(_px(a) - _px(b))
    return diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_requests_of_different_guidance_scales_share_a_call_and_keep_their_own(engine, mode):
    first = _img2img(A, 0.8) if mode == "img2img" else BASE
    batch = [first, replace(first, guidance_scale=6.0, seed=2, num_outputs=2),
             replace(first, guidance_scale=2.0, seed=3)]
    assert len({engine.batch_key(r) for r in batch}) == 1
    together = engine.generate(batch)
    for request, shared in zip(batch, together, strict=True):
        alone = engine.generate([request])[0]
        assert len(shared) == len(alone) and all(map(_close, shared, alone))


def test_a_withdrawn_request_leaves_and_the_others_keep_their_guidance_scales(engine):
    batch = [BASE, replace(BASE, guidance_scale=6.0, seed=2, num_outputs=2),
             replace(BASE, guidance_scale=2.0, seed=3)]
    steps = []
    out = engine.generate(batch, withdrawn=lambda: {1} if len(steps) >= 2 else set(),
                          on_step=lambda s, t: steps.append(s))
    assert [len(images) for images in out] == [1, 0, 1]
    assert _close(out[0][0], engine.generate([batch[0]])[0][0])
    assert _close(out[2][0], engine.generate([batch[2]])[0][0])


def test_img2img_strength_zero_returns_the_input(engine):
    (images,) = engine.generate([_img2img(A, 0.0, num_outputs=2)])
    assert all(np.array_equal(_px(im), A) for im in images)


def test_img2img_depends_less_on_the_input_as_strength_rises(engine):
    gaps = []
    for strength in (0.2, 0.5, 0.8, 1.0):
        a, b = (engine.generate([_img2img(x, strength)])[0][0] for x in (A, B))
        assert a.size == (128, 96)
        gaps.append(np.abs(_px(a) - _px(b)).mean())
    # Flow matching starts from pure noise once the first step is kept (strength over
    # (steps - 1) / steps, as 1.0): then the input no longer matters at all.
    assert gaps[0] > gaps[1] > gaps[2] > 0 and gaps[3] == 0
    # Measured 16.0, 6.2, 0.85 and 0 levels between the outputs of opposite inputs.


def test_inpainting_keeps_the_unmasked_pixels_and_its_seed_guarantee(engine):
    mask = np.zeros((96, 128), np.uint8)
    mask[20:70, 30:100] = 255

    def inpaint(seed, n=1):
        return replace(BASE, seed=seed, num_outputs=n,
                       source=SourceImage(A.tobytes(), 0.9, mask.tobytes()))

    assert inpaint(5).mode == "inpaint"
    alone = _px(engine.generate([inpaint(5)])[0][0])
    batched = engine.generate([inpaint(4), inpaint(5), inpaint(6, n=2)])
    diff = np.abs(alone - A.astype(int))
    assert diff[mask == 0].max() == 0 and diff[mask == 255].mean() > 20
    # Measured 87 levels of change inside the mask.
    together = np.abs(_px(batched[1][0]) - alone)
    assert together.max() <= 1 and (together > 0).mean() < 0.01
    assert np.abs(_px(batched[2][0]) - _px(batched[2][1]))[mask == 255].mean() > 1


def test_flux_refuses_what_its_family_does_not_take():
    flux = FAMILIES["flux"]
    cases = [(replace(BASE, width=120), "width"),
             (replace(BASE, negative_prompt="blurry"), "negative_prompt"),
             (replace(BASE, scheduler="K_EULER"), "scheduler")]
    for request, field in cases:
        with pytest.raises(InvalidField) as err:
            request.check_limits(LimitsConfig(), flux)
        assert err.value.field == field


def test_a_schnell_style_checkpoint_runs_and_ignores_guidance(tmp_path):
    """Schnell has no guidance embedding and a fixed-shift scheduler; the same engine
    serves it, and guidance makes no difference there."""
    from deployments.engines.flux import FluxEngine
    from deployments.tiny_flux import TINY_FLUX_CONFIGS, build_random_flux

    configs = {**TINY_FLUX_CONFIGS,
               "transformer": {**TINY_FLUX_CONFIGS["transformer"], "guidance_embeds": False},
               "scheduler": {"shift": 1.0, "use_dynamic_shifting": False}}
    build_random_flux(tmp_path, configs)
    engine = FluxEngine(tmp_path, "float32", "cpu")
    fast = replace(BASE, num_inference_steps=4)
    low, high = (engine.generate([replace(fast, guidance_scale=g)])[0][0] for g in (0.0, 9.0))
    assert low.size == (128, 96) and np.array_equal(_px(low), _px(high))


def test_a_model_built_from_configs_reads_its_t5_length_and_keeps_the_real_vocabulary(
        tmp_path):
    """As the FLUX.1-dev configs ask: T5 reads 512 tokens (the tiny model 256), and the
    encoders keep their configured vocabulary though the generated tokenizers are smaller;
    in bfloat16 every weight is saved in bfloat16."""
    import torch
    from safetensors import safe_open

    from deployments.engines.flux import FluxEngine
    from deployments.tiny_flux import TINY_FLUX_CONFIGS, build_random_flux

    configs = {**TINY_FLUX_CONFIGS, "tokenizer_2": {"model_max_length": 512, "_note": "x"},
               "text_encoder": {**TINY_FLUX_CONFIGS["text_encoder"], "vocab_size": 700},
               "text_encoder_2": {**TINY_FLUX_CONFIGS["text_encoder_2"], "vocab_size": 600}}
    build_random_flux(tmp_path, configs, "bfloat16")
    with safe_open(tmp_path / "text_encoder_2" / "model.safetensors", "pt") as f:
        names = list(f.keys())  # a safetensors file, not a dict
        assert f.get_tensor("shared.weight").shape == (600, 32)
        assert {f.get_tensor(name).dtype for name in names} == {torch.bfloat16}
    engine = FluxEngine(tmp_path, "float32", "cpu")
    assert engine.max_sequence_length == 512
    assert engine.pipe.text_encoder.get_input_embeddings().weight.shape == (700, 32)
    embeds, pooled = engine._encode_prompt("a photo of a shoe", "")
    assert embeds.shape == (1, 512, 32) and pooled.shape == (1, 32)


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_a_withdrawn_request_leaves_the_running_flux_batch_and_the_others_keep_their_pixels(
        engine, mode):
    first = _img2img(A, 0.8) if mode == "img2img" else BASE
    batch = [replace(first, num_inference_steps=5),
             replace(first, num_inference_steps=5, seed=2, num_outputs=2, prompt="a blue cone"),
             replace(first, num_inference_steps=5, seed=3, prompt="a green ball")]
    untouched = engine.generate(batch)
    steps, rows = [], []
    hook = engine.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(
            (kwargs["hidden_states"].shape[0], kwargs["pooled_projections"].shape[0],
             kwargs["guidance"].shape[0])), with_kwargs=True)
    try:
        out = engine.generate(batch, withdrawn=lambda: {1} if len(steps) >= 2 else set(),
                              on_step=lambda s, t: steps.append(s))
    finally:
        hook.remove()
    assert [len(images) for images in out] == [1, 0, 1]
    for kept in (0, 2):
        diff = np.abs(_px(out[kept][0]) - _px(untouched[kept][0]))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # This hook runs before the engine's, so it sees the pipeline's own inputs: guidance
    # and pooled embeddings for the 4 rows the call began with, latents of 2 rows once
    # the request has left after the second step.
    steps_run = len(rows)
    assert [r[0] for r in rows] == [4, 4] + [2] * (steps_run - 2)
    assert {r[1:] for r in rows} == {(4, 4)}
