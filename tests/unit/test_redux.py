"""FLUX.1 Redux on the tiny FLUX's engine with the embedded tiny Redux (CPU): the folder is
diffusers' FluxPriorReduxPipeline layout; an image prompt's images are what diffusers'
FluxPipeline draws from the prompt's T5 tokens followed by the tokens diffusers' Redux
modules make of the picture (averaged down by its downsampling factor as area pooling
averages them); requests with different pictures share a call, requests with another
number of picture tokens do not; the picture steers, less the fewer its tokens, and its
scale is not used; a repeated picture skips the encoder; warm-up, withdrawal,
the config's checks, and a Redux made for another transformer is refused."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.tiny import TINY_FLUX_REDUX, ensure_embedded
from serve.config import ConfigError, parse_config
from serve.errors import InvalidField
from serve.steering import ReduxConfig
from serve.types import GenerationRequest, ImagePrompt
from tests.pictures import png_bytes
from tests.unit.test_engine import _px, assert_same_pixels, withdrawing

BASE = GenerationRequest(model="a/flux", prompt="a red shoe on a table", width=128,
                         height=96, num_inference_steps=6, guidance_scale=3.5, seed=11,
                         scheduler="FlowMatchEuler")


def _picture(seed: int, size=(48, 40)) -> Image.Image:
    noise = np.random.RandomState(seed).rand(size[1], size[0], 3)
    return Image.fromarray((noise * 255).astype("uint8"))


NOISE, OTHER = _picture(1), _picture(2, (30, 50))


def _prompted(picture: Image.Image, scale: float = 1.0, downsampling: int = 1,
              **overrides) -> GenerationRequest:
    """A request with `picture` as its image prompt (its scale, as an IP-Adapter's)."""
    prompt = ImagePrompt(picture.tobytes(), *picture.size, scale, downsampling)
    return replace(BASE, image_prompt=prompt, **overrides)


@pytest.fixture(scope="module")
def redux_path(cache_dir):
    return ensure_embedded(TINY_FLUX_REDUX, cache_dir)


@pytest.fixture(scope="module")
def engine(tiny_flux_path, redux_path):
    from deployments.engines.flux import FluxEngine

    return FluxEngine(tiny_flux_path, "float32", "cpu", redux=redux_path)


def _reference(tiny_flux_path, redux_path, request: GenerationRequest, picture: Image.Image,
               pool: int = 1):
    """diffusers' own: FluxPipeline and FluxPriorReduxPipeline freshly loaded; the prior's
    encoder and embedder make the picture's tokens (their 8x8 grid mean-pooled in blocks
    of `pool`), which follow the prompt's T5 tokens (at the tiny tokenizer's length, as the
    engine reads it), as in Black Forest Labs' code."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe(**_reference_embeds(pipe, redux_path, request, picture, pool),
                width=request.width, height=request.height,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                generator=[torch.Generator().manual_seed(s) for s in request.seeds]).images


def _reference_embeds(pipe, redux_path, request: GenerationRequest, picture: Image.Image,
                      pool: int = 1) -> dict:
    """`pipe`'s prompt embeddings for each of the request's images: the prompt's T5 tokens
    followed by the tokens diffusers' Redux modules make of the picture, mean-pooled in
    blocks of `pool` on their 8x8 grid, and the prompt's pooled CLIP vector."""
    from diffusers import FluxPriorReduxPipeline

    prior = FluxPriorReduxPipeline.from_pretrained(redux_path)
    text, pooled, _ = pipe.encode_prompt(prompt=request.prompt, prompt_2=None,
                                         max_sequence_length=256)
    tokens = prior.image_embedder(prior.encode_image(picture, "cpu", 1)).image_embeds
    grid = torch.nn.functional.avg_pool2d(tokens.view(1, 8, 8, -1).permute(0, 3, 1, 2), pool)
    tokens = grid.flatten(2).transpose(1, 2)
    rows = request.num_outputs
    return {"prompt_embeds": torch.cat([text, tokens], dim=1).repeat(rows, 1, 1),
            "pooled_prompt_embeds": pooled.repeat(rows, 1)}


def test_the_embedded_redux_is_saved_as_black_forest_labs_ships_it(redux_path):
    index = json.loads((redux_path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPriorReduxPipeline"
    assert index["image_encoder"] == ["transformers", "SiglipVisionModel"]
    assert index["image_embedder"][1] == "ReduxImageEncoder"
    assert index["feature_extractor"][1].startswith("SiglipImageProcessor")
    assert (redux_path / "image_encoder" / "model.safetensors").is_file()
    assert (redux_path / "image_embedder" / "diffusion_pytorch_model.safetensors").is_file()


def test_an_image_prompts_images_are_diffusers_own(engine, tiny_flux_path, redux_path):
    """In one call: two images of one picture with a prompt and one of another picture
    without, each what diffusers draws for it alone; and a call of pictures averaged
    down by 4 (2x2 tokens), as the tokens mean-pooled in 4x4 blocks draw."""
    batch = [_prompted(NOISE, num_outputs=2), _prompted(OTHER, seed=4, prompt="")]
    pooled = [_prompted(OTHER, downsampling=4), _prompted(NOISE, downsampling=4, seed=2)]
    assert len({engine.batch_key(r) for r in batch}) == len(
        {engine.batch_key(r) for r in pooled}) == 1
    cases = [(request, images, picture, pool) for group, pictures, pool in (
        (batch, (NOISE, OTHER), 1), (pooled, (OTHER, NOISE), 4))
        for request, images, picture in zip(group, engine.generate(group), pictures,
                                            strict=True)]
    for request, images, picture, pool in cases:
        theirs = _reference(tiny_flux_path, redux_path, request, picture, pool)
        assert len(images) == request.num_outputs
        for mine, reference in zip(images, theirs, strict=True):
            assert_same_pixels(mine, reference)


def test_the_picture_moves_the_image_and_a_scale_is_not_applied(engine):
    plain = _px(engine.generate([BASE])[0][0])
    noise = _px(engine.generate([_prompted(NOISE)])[0][0])
    other = _px(engine.generate([_prompted(OTHER)])[0][0])
    assert np.abs(plain - noise).max() >= 6  # not rounding: parts of the image change
    assert np.abs(noise - other).mean() > 0.1
    # Without a prompt, the picture alone steers: two pictures, two images.
    alone = [_px(engine.generate([_prompted(p, prompt="")])[0][0]) for p in (NOISE, OTHER)]
    assert np.abs(alone[0] - alone[1]).mean() > 0.1
    assert np.array_equal(_px(engine.generate([_prompted(NOISE, 0.2)])[0][0]), noise)
    # Averaged down, the picture moves the image less, and less again the further.
    moved = [np.abs(_px(engine.generate([_prompted(NOISE, downsampling=k)])[0][0]) - plain
                    ).mean() for k in (1, 2, 4, 8)]
    assert moved == sorted(moved, reverse=True) and moved[-1] < moved[0] / 4


def test_requests_with_an_image_prompt_batch_apart_from_those_without(engine):
    """A Redux row reads more prompt tokens than a plain one, so they cannot share a call,
    nor rows of different numbers of picture tokens; the picture does not part requests."""
    keys = {engine.batch_key(r) for r in (_prompted(NOISE), _prompted(OTHER, prompt=""))}
    assert len(keys) == 1
    assert engine.batch_key(BASE) not in keys
    fewer = {engine.batch_key(_prompted(NOISE, downsampling=k)) for k in (3, 4)}
    assert len(fewer) == 1 and not fewer & keys  # 8 // 3 == 8 // 4: 2x2 tokens each
    assert engine.prepare(_prompted(NOISE, downsampling=9))[0].embeds[0].shape[1] == 257
    with pytest.raises(ValueError, match="equal batch keys"):
        engine.generate([BASE, _prompted(NOISE)])
    text = engine.prepare(BASE)[0].embeds[0]
    prompted = engine.prepare(_prompted(NOISE))[0].embeds[0]
    assert prompted.shape == (1, text.shape[1] + 64, 32)  # 8x8 SigLIP patches more
    assert torch.equal(prompted[:, :text.shape[1]], text)


def test_a_withdrawn_request_leaves_and_the_others_keep_their_image_prompts(engine):
    batch = [_prompted(NOISE, num_inference_steps=5),
             _prompted(OTHER, seed=2, num_outputs=2, num_inference_steps=5),
             _prompted(OTHER, seed=3, prompt="a green ball", num_inference_steps=5)]
    untouched, _ = withdrawing(engine, batch, None, engine.pipe.transformer,
                               lambda a, k: k["hidden_states"].shape[0])
    out, rows = withdrawing(engine, batch, 2, engine.pipe.transformer,
                            lambda a, k: (k["hidden_states"].shape[0],
                                          k["encoder_hidden_states"].shape[0]))
    assert [len(images) for images in out] == [1, 0, 1]
    assert rows[:2] == [(4, 4)] * 2 and set(rows[2:]) == {(2, 2)}
    for kept in (0, 2):
        assert_same_pixels(out[kept][0], untouched[kept][0])


def test_a_repeated_picture_skips_the_encoder_and_warm_up_runs_image_prompted_calls(
        tiny_flux_path, redux_path):
    from deployments.engines.flux import FluxEngine

    engine = FluxEngine(tiny_flux_path, "float32", "cpu", redux=redux_path)
    encoded, tokens = [], []
    engine.redux.encoder.register_forward_hook(lambda *a: encoded.append(1))
    engine.pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: tokens.append(k["encoder_hidden_states"].shape[1]), with_kwargs=True)
    engine.warm_up(replace(BASE, num_inference_steps=2), max_images=2)
    # Calls of 1 and 2 images, plain (256 tokens) and with an image prompt (64 more).
    assert tokens == [256] * 4 + [320] * 4 and encoded == [1]
    first = engine.redux.tokens(_prompted(NOISE).image_prompt.pictures[0])
    again = engine.redux.tokens(_prompted(NOISE).image_prompt.pictures[0])
    assert again is first and len(encoded) == 2
    assert engine.describe()["redux"] is True


def test_a_redux_for_another_transformer_is_refused_at_load(tiny_flux_path, tmp_path):
    from deployments.engines.flux import FluxEngine
    from deployments.tiny_flux import TINY_SIGLIP, build_random_redux

    build_random_redux(tmp_path / "wide", TINY_SIGLIP, txt_in_features=64)
    with pytest.raises(ValueError, match="64 wide.*32 wide"):
        FluxEngine(tiny_flux_path, "float32", "cpu", redux=tmp_path / "wide")


def test_the_config_checks_the_redux_folder_and_the_model(tmp_path, redux_path):
    def config(redux, **model):
        return parse_config({"models": [{"id": "a/b", "family": "flux",
                                         "embedded": "tiny-flux", "redux": redux, **model}]})

    config({"path": str(redux_path)}).check_paths()
    copy = tmp_path / "copy"
    shutil.copytree(redux_path, copy)
    (copy / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ConfigError, match=r"models\.0\.redux\.path: .* not a FLUX\.1 Redux"):
        config({"path": str(copy)}).check_paths()
    config({"embedded": "tiny-flux-redux"}, embedded="tiny-flux-kontext", kontext=True)
    config({"embedded": "tiny-flux-redux"}, embedded="tiny-flux-canny", canny=True)
    config({"embedded": "tiny-flux-redux"}, embedded="tiny-flux-fill", fill=True)
    with pytest.raises(ConfigError, match="redux: only flux models"):
        parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl",
                                  "redux": {"embedded": "tiny-flux-redux"}}]})
    with pytest.raises(ConfigError, match="scale"):  # Redux has none
        config({"embedded": "tiny-flux-redux", "scale": 0.5})
    with pytest.raises(ConfigError, match="downsampling"):
        config({"embedded": "tiny-flux-redux", "downsampling": 10})
    model = config({"embedded": "tiny-flux-redux", "downsampling": 3}).models[0]
    assert model.redux.downsampling == 3
    plain = parse_config({"models": [{"id": "a/b", "family": "flux",
                                      "embedded": "tiny-flux"}]}).models[0]
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(plain, "x", image_prompt=_prompted(NOISE).image_prompt)
    assert refused.value.field == "redux_image"


def test_a_models_version_pins_its_reduxs_weights_and_downsampling(tmp_path, redux_path):
    from serve.config import ModelConfig
    from serve.versions import version_id

    def version(**redux):
        return version_id(ModelConfig(id="a/b", family="flux", embedded="tiny-flux",
                                      redux=redux or None), tmp_path)

    copy = tmp_path / "copy"
    shutil.copytree(redux_path, copy)
    weights = copy / "image_embedder" / "diffusion_pytorch_model.safetensors"
    one = version(path=copy)
    assert one == version(path=copy)
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert len({version(), one, version(path=copy), version(embedded="tiny-flux-redux"),
                version(path=copy, downsampling=3)}) == 5


def test_replicates_flux_input_takes_a_redux_image_in_place_of_a_prompt():
    from pydantic import ValidationError

    from serve.routes.replicate_flux import FluxInput
    from serve.routes.replicate_schemas import input_schema

    given = FluxInput.model_validate({"redux_image": "data:image/png;base64,AAAA",
                                      "redux_downsampling": 3})
    assert given.prompt == "" and tuple(given.image_prompt())[:4] == (
        "data:image/png;base64,AAAA", None, "redux_image", 3)
    for bad in ({}, {"prompt": ""}):
        with pytest.raises(ValidationError) as refused:
            FluxInput.model_validate({"seed": 1, **bad})
        assert [e["loc"] for e in refused.value.errors()] == [("prompt",)]

    def schema(**redux):
        model = parse_config({"models": [{"id": "a/b", "family": "flux",
                                          "embedded": "tiny-flux", **redux}]}).models[0]
        return input_schema(model)

    plain, with_redux = schema(), schema(redux={"embedded": "tiny-flux-redux"})
    assert "redux_image" not in plain["properties"] and "prompt" in plain["required"]
    assert {"redux_image", "redux_downsampling"} <= set(with_redux["properties"])
    assert "prompt" not in with_redux.get("required", [])


def test_a_fill_model_draws_the_picture_into_the_masked_part(redux_path, cache_dir):
    """Redux on FLUX.1 Fill (a product drawn into a photo's masked part): the images are
    diffusers' FluxFillPipeline's given the prompt's tokens followed by the picture's, the
    unmasked pixels the photo's own; a fill with a picture batches apart from one without."""
    from diffusers import FluxFillPipeline

    from deployments.engines.flux import FluxFillEngine
    from deployments.tiny import TINY_FLUX_FILL
    from serve.source_images import source_image
    from tests.unit.test_fill import MASK, MODEL, PHOTO, _assert_filled

    fill_path = ensure_embedded(TINY_FLUX_FILL, cache_dir)
    engine = FluxFillEngine(fill_path, "float32", "cpu", redux=redux_path)
    source, width, height = source_image(png_bytes(PHOTO), png_bytes(MASK), 0.4, None, None, MODEL)
    request = _prompted(NOISE, width=width, height=height, source=source, guidance_scale=30,
                        num_outputs=2, num_inference_steps=4)
    plain = replace(request, image_prompt=None)
    assert engine.batch_key(request) != engine.batch_key(plain)
    (ours,), ((without, _),) = engine.generate([request]), engine.generate([plain])
    pipe = FluxFillPipeline.from_pretrained(fill_path)
    pipe.set_progress_bar_config(disable=True)
    size = (width, height)
    theirs = pipe(**_reference_embeds(pipe, redux_path, request, NOISE),
                  image=[Image.frombytes("RGB", size, source.rgb)] * 2,
                  mask_image=[Image.frombytes("L", size, source.mask)] * 2, width=width,
                  height=height, num_inference_steps=4, guidance_scale=30,
                  generator=[torch.Generator().manual_seed(s) for s in request.seeds]).images
    for mine, reference in zip(ours, theirs, strict=True):
        _assert_filled(mine, reference, request)
    assert np.abs(_px(ours[0]) - _px(without)).max() >= 4  # the picture moved the fill


def test_a_kontext_edit_reads_the_pictures_tokens_after_the_prompts(redux_path, cache_dir):
    """Redux on FLUX.1 Kontext (an edit styled after a picture): the images are diffusers'
    FluxKontextPipeline's for the reference, given the prompt's tokens followed by the
    picture's; an edit with a picture batches apart from one without."""
    from diffusers import FluxKontextPipeline

    from deployments.engines import create_engine
    from deployments.tiny import TINY_FLUX_KONTEXT
    from serve.source_images import source_image
    from tests.unit.test_kontext import MODEL, PHOTO

    model = MODEL.model_copy(update={"redux": ReduxConfig(embedded="tiny-flux-redux")})
    engine = create_engine(model, cache_dir, None)
    source, width, height = source_image(png_bytes(PHOTO), None, 0.8, None, None, model)
    request = _prompted(NOISE, width=width, height=height, source=source, guidance_scale=2.5,
                        num_outputs=2, num_inference_steps=4, prompt="paint it like this")
    plain = replace(request, image_prompt=None)
    assert request.mode == "edit" and engine.batch_key(request) != engine.batch_key(plain)
    (ours,), ((without, _),) = engine.generate([request]), engine.generate([plain])
    pipe = FluxKontextPipeline.from_pretrained(ensure_embedded(TINY_FLUX_KONTEXT, cache_dir))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(**_reference_embeds(pipe, redux_path, request, NOISE),
                  image=Image.frombytes("RGB", (width, height), source.rgb), width=width,
                  height=height, max_area=width * height, _auto_resize=False,
                  num_inference_steps=4, guidance_scale=2.5,
                  generator=[torch.Generator().manual_seed(s) for s in request.seeds]).images
    for mine, reference in zip(ours, theirs, strict=True):
        assert_same_pixels(mine, reference)
    assert np.abs(_px(ours[0]) - _px(without)).mean() > 0.5  # the picture moved the edit


def test_a_depth_model_draws_the_pictures_content_along_another_pictures_depth(
        redux_path, cache_dir):
    """Redux on FLUX.1 Depth (a style from one picture, the layout from another): the
    images are diffusers' FluxControlPipeline's for the layout's depth map, given the
    prompt's tokens followed by the style picture's."""
    from diffusers import FluxControlPipeline

    from deployments.engines import create_engine
    from deployments.tiny import TINY_FLUX_DEPTH
    from serve.source_images import source_image
    from tests.unit.test_depth import MODEL, SCENE

    model = MODEL.model_copy(update={"redux": ReduxConfig(embedded="tiny-flux-redux")})
    engine = create_engine(model, cache_dir, None)
    source, width, height = source_image(png_bytes(SCENE), None, 0.4, None, None, model)
    request = _prompted(NOISE, width=width, height=height, source=source, guidance_scale=10,
                        num_outputs=2, num_inference_steps=4)
    plain = replace(request, image_prompt=None)
    assert engine.batch_key(request) != engine.batch_key(plain)
    (ours,), ((without, _),) = engine.generate([request]), engine.generate([plain])
    pipe = FluxControlPipeline.from_pretrained(ensure_embedded(TINY_FLUX_DEPTH, cache_dir))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(**_reference_embeds(pipe, redux_path, request, NOISE),
                  control_image=engine.depth_maps.of(SCENE), width=width, height=height,
                  num_inference_steps=4, guidance_scale=10,
                  generator=[torch.Generator().manual_seed(s) for s in request.seeds]).images
    for mine, reference in zip(ours, theirs, strict=True):
        assert_same_pixels(mine, reference)
    # The picture moved the image (measured: 0.74 levels on average, 8 at most).
    difference = np.abs(_px(ours[0]) - _px(without))
    assert difference.mean() > 0.3 and difference.max() >= 4
