"""SDXL textual-inversion embeddings (`textual_inversions`), on the tiny SDXL (CPU): a
prompt or negative prompt using the token gives the pixels of diffusers' pipeline with the
same file loaded, prompts without it the plain model's; bad files, tokens and families
are refused; the version follows the tokens and the files' bytes."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from serve.config import ConfigError, ModelConfig, parse_config
from serve.types import GenerationRequest
from serve.versions import version_id
from tests.unit.test_engine import _px, assert_same_pixels

TOKEN = "<shiny-style>"
REQUEST = GenerationRequest(model="a/b", prompt=f"a {TOKEN} cube on a table", width=64,
                            height=64, num_inference_steps=3, guidance_scale=6.0, seed=4,
                            scheduler="K_EULER")


def _embedding(folder, vectors: int = 2, **tensors) -> object:
    """An SDXL embedding file of `vectors` vectors for each tiny text encoder (32 wide),
    as SDXL embeddings are shared (clip_l, clip_g); `tensors` replace its entries."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(vectors)
    state = {"clip_l": torch.randn(vectors, 32, generator=generator),
             "clip_g": torch.randn(vectors, 32, generator=generator)} | tensors
    file = folder / f"embedding-{vectors}-{'-'.join(sorted(state))}.safetensors"
    save_file({k: v for k, v in state.items() if v is not None}, str(file))
    return file


@pytest.fixture(scope="module")
def embedding(tmp_path_factory):
    return _embedding(tmp_path_factory.mktemp("embeddings"))


@pytest.fixture(scope="module")
def embedded(tiny_sdxl_path, embedding):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float32", "cpu", textual_inversions=[(embedding, TOKEN)])


def test_a_prompt_with_the_token_is_drawn_as_diffusers_draws_it(embedded, embedding,
                                                                tiny_sdxl_path, sdxl):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    vectors = load_file(embedding)
    pipe.load_textual_inversion(vectors["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["clip_g"], token=TOKEN,
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    negative = replace(REQUEST, prompt="a cube on a table", negative_prompt=f"{TOKEN}, blur")
    for request in (REQUEST, negative):
        ours = embedded.generate([request])[0][0]
        theirs = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                      width=64, height=64, num_inference_steps=3, guidance_scale=6.0,
                      generator=torch.Generator().manual_seed(4)).images[0]
        assert_same_pixels(ours, theirs)
        without = replace(request, prompt=request.prompt.replace(TOKEN, "shiny"),
                          negative_prompt=request.negative_prompt.replace(TOKEN, "shiny"))
        assert np.abs(_px(ours) - _px(embedded.generate([without])[0][0])).mean() > 1
    assert embedded.describe()["embeddings"] == (TOKEN,)


def test_prompts_without_the_token_are_the_plain_models(embedded, sdxl):
    plain = replace(REQUEST, prompt="a red cube on a table")
    assert np.array_equal(_px(embedded.generate([plain])[0][0]),
                          _px(sdxl.generate([plain])[0][0]))


def test_a_models_config_loads_its_embeddings(embedding, embedded, tmp_path):
    from deployments.engines import create_engine

    model = ModelConfig(id="a/b", embedded="tiny-sdxl", textual_inversions=[
        {"path": embedding, "token": TOKEN}])
    engine = create_engine(model, tmp_path, None)
    assert engine.describe()["embeddings"] == (TOKEN,)
    assert np.array_equal(_px(engine.generate([REQUEST])[0][0]),
                          _px(embedded.generate([REQUEST])[0][0]))


def test_an_embedding_without_both_encoders_vectors_is_refused_naming_the_file(tmp_path,
                                                                               tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    half = _embedding(tmp_path, clip_g=None)
    with pytest.raises(ValueError, match=rf"{half.name}: .* it has no clip_g"):
        SDXLEngine(tiny_sdxl_path, "float32", "cpu", textual_inversions=[(half, TOKEN)])


def _models(**model):
    return {"models": [{"id": "a/b", "embedded": "tiny-sdxl", **model}]}


def test_the_config_checks_tokens_families_and_files(embedding, tmp_path):
    entry = {"path": str(embedding), "token": TOKEN}
    cases = [(_models(family="flux", embedded="tiny-flux", textual_inversions=[entry]),
              "textual_inversions: only sdxl models"),
             (_models(textual_inversions=[entry, entry]), "each embedding needs its own token"),
             (_models(textual_inversions=[entry | {"token": "two words"}]),
              r"textual_inversions\.0\.token")]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_config(config)
    missing = parse_config(_models(textual_inversions=[entry | {"path": str(tmp_path / "x")}]))
    with pytest.raises(ConfigError, match=r"models\.0\.textual_inversions\.0\.path: .* is not"):
        missing.check_paths()
    parse_config(_models(textual_inversions=[entry])).check_paths()


def test_the_version_follows_the_tokens_and_the_files(embedding, tmp_path):
    def version(file, token=TOKEN):
        return version_id(ModelConfig(id="a/b", embedded="tiny-sdxl", textual_inversions=[
            {"path": file, "token": token}]), tmp_path)

    other = _embedding(tmp_path, vectors=3)
    plain = version_id(ModelConfig(id="a/b", embedded="tiny-sdxl"), tmp_path)
    ids = {plain, version(embedding), version(embedding, "<other>"), version(other)}
    assert len(ids) == 4 and version(embedding) == version(embedding)
