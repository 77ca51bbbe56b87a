"""Named styles (`styles`): a request's prompt set into the style's template and the style's
negative prompt put before its own, checked as the config and the request are read."""

import pytest

from serve.config import ConfigError, ModelConfig, parse_config
from serve.errors import InvalidField
from serve.types import GenerationRequest
from serve.versions import version_id

CINEMATIC = {"prompt": "cinematic still of {prompt}, film grain", "negative_prompt": "cartoon"}
MODEL = ModelConfig(id="a/b", embedded="tiny-sdxl", styles={"cinematic": CINEMATIC,
                                                            "plain": {"prompt": "{prompt}"}})


def test_a_style_sets_the_prompt_into_its_template_and_leads_the_negative_prompt():
    styled = GenerationRequest.for_model(MODEL, "a lighthouse", style="cinematic",
                                         negative_prompt="blurry")
    assert styled.prompt == "cinematic still of a lighthouse, film grain"
    assert styled.negative_prompt == "cartoon, blurry"
    alone = GenerationRequest.for_model(MODEL, "a lighthouse", style="cinematic")
    assert alone.negative_prompt == "cartoon"
    plain = GenerationRequest.for_model(MODEL, "a lighthouse", style="plain",
                                        negative_prompt="blurry")
    assert (plain.prompt, plain.negative_prompt) == ("a lighthouse", "blurry")
    unstyled = GenerationRequest.for_model(MODEL, "a lighthouse")
    assert (unstyled.prompt, unstyled.negative_prompt) == ("a lighthouse", "")


def test_an_unknown_style_names_the_field_and_the_styles():
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(MODEL, "x", style="noir")
    assert refused.value.field == "style" and refused.value.reason == "one of cinematic, plain"
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(ModelConfig(id="a/c", embedded="tiny-sdxl"), "x",
                                    style="cinematic")
    assert refused.value.field == "style" and "has no styles" in refused.value.reason


def test_the_config_checks_each_style():
    with pytest.raises(ConfigError, match=r"styles\.bad\.prompt"):
        parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl",
                                  "styles": {"bad": {"prompt": "no placeholder"}}}]})
    with pytest.raises(ConfigError, match=r"styles\.cinematic\.negative_prompt: FLUX"):
        parse_config({"models": [{"id": "a/f", "family": "flux", "embedded": "tiny-flux",
                                  "styles": {"cinematic": CINEMATIC}}]})
    flux = parse_config({"models": [{"id": "a/f", "family": "flux", "embedded": "tiny-flux",
                                     "styles": {"film": {"prompt": "{prompt}, 35mm"}}}]})
    request = GenerationRequest.for_model(flux.models[0], "a cat", style="film")
    assert (request.prompt, request.negative_prompt) == ("a cat, 35mm", "")


def test_styles_are_part_of_the_version(tmp_path):
    ids = {version_id(ModelConfig(id="a/b", embedded="tiny-sdxl", styles=styles), tmp_path)
           for styles in ({}, {"c": CINEMATIC}, {"c": CINEMATIC | {"negative_prompt": ""}})}
    assert len(ids) == 3
    assert version_id(ModelConfig(id="a/b", embedded="tiny-sdxl"), tmp_path) in ids


def test_replicates_schema_offers_the_styles_and_hides_the_field_without_any():
    from serve.routes.replicate_schemas import input_schema

    assert input_schema(MODEL)["properties"]["style"]["enum"] == ["cinematic", "plain"]
    assert "style" not in input_schema(ModelConfig(id="a/c", embedded="tiny-sdxl"))[
        "properties"]
    kontext = ModelConfig(id="a/k", family="flux", embedded="tiny-flux-kontext", kontext=True,
                          styles={"film": {"prompt": "{prompt}, 35mm"}})
    assert input_schema(kontext)["properties"]["style"]["enum"] == ["film"]
