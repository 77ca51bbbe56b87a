"""A model's upscaling aliases (`upscaling_aliases`): under one, Replicate predictions take
nightmareai/real-esrgan's inputs and schema and answer one URL; the request built is the
image at strength 0, enlarged by the model's first upscaler; the configs and inputs
refused. (`tests/integration/test_upscale.py` runs one with the official client.)"""

import pytest
from fastapi.exceptions import RequestValidationError

from serve.config import ConfigError, ModelConfig, parse_config
from serve.routes.replicate_schemas import (
    input_class,
    input_schema,
    parse_input,
    single_output,
)
from serve.routes.replicate_upscale import RealEsrganInput

ALIAS = "nightmareai/real-esrgan"
MODEL = {"id": "a/b", "embedded": "tiny-sdxl", "aliases": ["stability-ai/sdxl"],
         "upscalers": {"sharp": {"embedded": "tiny-esrgan"}}, "upscaling_aliases": [ALIAS],
         "defaults": {"width": 64, "height": 64}}


def test_under_the_alias_the_inputs_schema_and_output_are_real_esrgans():
    model = ModelConfig(**MODEL)
    assert input_class(model, ALIAS) is RealEsrganInput
    assert input_class(model, "stability-ai/sdxl") is not RealEsrganInput
    assert set(input_schema(model, ALIAS)["properties"]) == {"image", "scale", "face_enhance"}
    assert input_schema(model, ALIAS)["required"] == ["image"]
    assert "prompt" in input_schema(model, "a/b")["properties"]
    assert single_output(model, ALIAS) and not single_output(model, "a/b")
    inp = parse_input(model, {"image": "data:,", "scale": 2}, ALIAS)
    assert inp.request_args() == {"width": None, "height": None, "num_outputs": 1,
                                  "upscale": 2, "upscaler": None, "through_upscaler": True,
                                  "output_format": "png"}
    assert parse_input(model, {"image": "data:,", "scale": 0.5}, ALIAS).scale == 0.5
    assert (inp.prompt_strength, inp.mask, inp.lora_refs()) == (0.0, None, [])
    assert inp.field_of("width") == "image" and inp.field_of("upscale") == "scale"


@pytest.mark.parametrize(("raw", "field"), [
    ({"image": "x", "face_enhance": True}, "face_enhance"),
    ({"image": "x", "scale": 11}, "scale"),
    ({"image": "x", "scale": 0}, "scale"),
    ({"scale": 2}, "image"),
    ({"image": "x", "prompt": "a cat"}, "prompt"),
])
def test_what_real_esrgan_takes_and_this_server_does_not_is_refused_naming_it(raw, field):
    with pytest.raises(RequestValidationError) as refused:
        parse_input(ModelConfig(**MODEL), raw, ALIAS)
    assert refused.value.errors()[0]["loc"] == ("body", "input", field)


@pytest.mark.parametrize(("change", "message"), [
    ({"upscalers": {}}, "needs an upscaler"),
    ({"upscaling_aliases": ["Real-ESRGAN"]}, "owner/name form"),
    ({"upscaling_aliases": ["stability-ai/sdxl"]}, "used twice"),
])
def test_configs_that_cannot_serve_the_alias_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": [MODEL | change]})


def test_the_alias_has_its_own_version_following_the_models():
    from serve.versions import upscaling_version

    one = upscaling_version("a" * 64, ALIAS)
    assert one == upscaling_version("a" * 64, ALIAS) and len(one) == 64
    assert one not in (upscaling_version("b" * 64, ALIAS), "a" * 64,
                       upscaling_version("a" * 64, "other/upscaler"))
