import pytest

from serve.config import LimitsConfig, ModelConfig
from serve.errors import InvalidField
from serve.types import MAX_SEED, GenerationRequest


def _req(**overrides):
    base = {"model": "a/b", "prompt": "p", "width": 64, "height": 64, "num_inference_steps": 2,
                "guidance_scale": 7.0, "seed": 5, "scheduler": "K_EULER"}
    return GenerationRequest(**{**base, **overrides})


def test_each_output_gets_the_next_seed_wrapping_at_two_to_the_32():
    assert _req(num_outputs=3).seeds == [5, 6, 7]
    assert _req(seed=MAX_SEED, num_outputs=2).seeds == [MAX_SEED, 0]


def test_batch_key_ignores_prompt_seed_and_output_count_but_not_size():
    assert _req(prompt="x", seed=1, num_outputs=2).batch_key == _req().batch_key
    assert _req(width=128).batch_key != _req().batch_key
    assert _req(scheduler="DDIM").batch_key != _req().batch_key


@pytest.mark.parametrize("overrides, field", [
    ({"width": 65}, "width"),
    ({"height": 4096}, "height"),
    ({"width": 32}, "width"),
    ({"width": 1024, "height": 2048}, "width"),
    ({"num_inference_steps": 51}, "num_inference_steps"),
    ({"num_outputs": 5}, "num_outputs"),
    ({"scheduler": "LMS"}, "scheduler"),
])
def test_values_outside_the_model_limits_name_their_field(overrides, field):
    limits = LimitsConfig(max_size=2048, max_pixels=1024 * 1024, max_steps=50, max_outputs=4)
    with pytest.raises(InvalidField) as err:
        _req(**overrides).check_limits(limits)
    assert err.value.field == field
    assert err.value.detail()[0]["loc"] == ["body", field]


def test_values_inside_the_limits_pass():
    _req(width=1024, height=1024, num_outputs=4).check_limits(LimitsConfig())


def test_a_request_over_the_memory_budget_is_refused_on_num_outputs():
    limits = LimitsConfig(max_pixels=1024 * 1024, max_request_pixels=2 * 1024 * 1024)
    _req(width=1024, height=1024, num_outputs=2).check_limits(limits)
    with pytest.raises(InvalidField, match="at most 2097152 pixels.*got 3145728") as err:
        _req(width=1024, height=1024, num_outputs=3).check_limits(limits)
    assert err.value.field == "num_outputs"


@pytest.mark.parametrize("allow_disable, asked, checked", [
    (True, False, False), (True, True, True), (False, False, True), (False, True, True)])
def test_a_request_skips_the_safety_check_only_where_the_model_lets_it(allow_disable, asked,
                                                                        checked):
    model = ModelConfig.model_validate({
        "id": "acme/m", "embedded": "tiny-sdxl",
        "safety_checker": {"path": "/models/checker", "allow_disable": allow_disable}})
    request = GenerationRequest.for_model(model, "x", seed=1, safety_check=asked)
    assert request.safety_check is checked


@pytest.mark.parametrize("allow_disable, asked, marked", [
    (True, False, False), (True, True, True), (False, False, True), (False, True, True)])
def test_a_request_leaves_the_watermark_out_only_where_the_model_lets_it(allow_disable, asked,
                                                                          marked):
    model = ModelConfig.model_validate({"id": "acme/m", "embedded": "tiny-sdxl",
                                        "watermark": {"allow_disable": allow_disable}})
    request = GenerationRequest.for_model(model, "x", seed=1, watermark=asked)
    assert request.watermark is marked


def test_models_are_watermarked_unless_their_config_says_null():
    marked = ModelConfig.model_validate({"id": "acme/m", "embedded": "tiny-sdxl"})
    assert marked.watermark is not None and marked.watermark.allow_disable
    plain = ModelConfig.model_validate({"id": "acme/m", "embedded": "tiny-sdxl",
                                        "watermark": None})
    assert plain.watermark is None
