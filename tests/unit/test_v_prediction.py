"""v-prediction SDXL fine-tunes trained to zero terminal SNR, on the tiny SDXL (CPU): the
model's zero-SNR schedulers and a request's guidance rescale give diffusers' own pixels,
each request keeps its own rescale in a batch, only the schedulers that can rescale are
offered, and the config's and requests' checks."""

from dataclasses import replace

import numpy as np
import pytest

from serve.config import ConfigError, ModelConfig, parse_config
from serve.errors import InvalidField
from serve.model_parts import SCHEDULERS, ZERO_SNR_SCHEDULERS
from serve.types import ControlImage, GenerationRequest
from serve.versions import version_id
from tests.unit.test_engine import _px, assert_same_pixels
from tests.unit.test_few_step import _diffusers

V_PRED = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
          "timestep_spacing": "trailing"}
BASE = GenerationRequest(model="a/b", prompt="a red cube", width=64, height=64,
                         num_inference_steps=4, guidance_scale=6.0, seed=5,
                         scheduler="K_EULER", guidance_rescale=0.7)


@pytest.fixture(scope="module")
def v_pred(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float32", "cpu", scheduler_options=V_PRED)


@pytest.mark.parametrize("scheduler", ["K_EULER", "DDIM"])
def test_zero_snr_v_prediction_with_guidance_rescale_is_diffusers_own(v_pred, tiny_sdxl_path,
                                                                     scheduler):
    request = replace(BASE, scheduler=scheduler, num_outputs=2)
    ours = v_pred.generate([request])[0]
    theirs = _diffusers(tiny_sdxl_path, scheduler, V_PRED, request, (5, 6),
                        guidance_rescale=0.7)
    for a, b in zip(ours, theirs, strict=True):
        assert_same_pixels(a, b)
    plain = v_pred.generate([replace(request, guidance_rescale=0.0, num_outputs=1)])[0][0]
    assert np.abs(_px(ours[0]) - _px(plain)).mean() > 1
    euler = v_pred._schedulers[scheduler].config
    assert (euler.prediction_type, euler.rescale_betas_zero_snr) == ("v_prediction", True)


def test_requests_of_other_rescales_share_a_call_each_rescaled_by_its_own(v_pred):
    """A zero-SNR model's requests of other rescales share a call: each image is its
    request's alone (`tests/unit/test_row_guidance.py` has the products row by row)."""
    other = replace(BASE, guidance_rescale=0.0, seed=9)
    assert BASE.shared_key != other.shared_key
    assert v_pred.batch_key(BASE) == v_pred.batch_key(other)
    together = v_pred.generate([BASE, other])
    for shared, request in zip(together, (BASE, other), strict=True):
        assert_same_pixels(shared[0], v_pred.generate([request])[0][0])


def test_only_the_schedulers_that_rescale_to_zero_snr_are_built_and_offered(v_pred, sdxl):
    assert set(v_pred._schedulers) == set(ZERO_SNR_SCHEDULERS)
    assert set(sdxl._schedulers) == set(SCHEDULERS)
    assert set(SCHEDULERS) - set(ZERO_SNR_SCHEDULERS) == {"HeunDiscrete", "PNDM", "DEIS"}
    assert v_pred.describe()["scheduler_options"] == V_PRED
    model = ModelConfig(id="a/b", embedded="tiny-sdxl", scheduler_options=V_PRED)
    assert model.rules.schedulers == ZERO_SNR_SCHEDULERS
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(model, "x", scheduler="HeunDiscrete")
    assert refused.value.field == "scheduler" and "HeunDiscrete" not in str(refused.value)
    assert GenerationRequest.for_model(model, "x", scheduler="DDIM").scheduler == "DDIM"


def test_a_request_takes_the_models_rescale_unless_it_gives_one():
    model = ModelConfig(id="a/b", embedded="tiny-sdxl", scheduler_options=V_PRED,
                        defaults={"guidance_rescale": 0.7})
    assert GenerationRequest.for_model(model, "x").guidance_rescale == 0.7
    assert GenerationRequest.for_model(model, "x", guidance_rescale=0.0).guidance_rescale == 0
    plain = ModelConfig(id="a/b", embedded="tiny-sdxl")
    assert GenerationRequest.for_model(plain, "x").guidance_rescale == 0


def test_flux_refuses_a_rescale_naming_the_field_and_controlnet_calls_take_one():
    flux = ModelConfig(id="a/f", family="flux", embedded="tiny-flux")
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(flux, "x", guidance_rescale=0.5)
    assert refused.value.field == "guidance_rescale"
    assert GenerationRequest.for_model(flux, "x", guidance_rescale=0.0).guidance_rescale == 0
    nets = ModelConfig(id="a/b", embedded="tiny-sdxl",
                       controlnets={"canny": {"embedded": "tiny-sdxl-controlnet"}})
    control = ControlImage(name="canny", rgb=b"\0" * 64 * 64 * 3)
    assert GenerationRequest.for_model(nets, "x", guidance_rescale=0.5,
                                       controls=(control,)).guidance_rescale == 0.5
    defaults = ModelConfig(id="a/b", embedded="tiny-sdxl", defaults={"guidance_rescale": 0.7},
                           controlnets={"canny": {"embedded": "tiny-sdxl-controlnet"}})
    assert defaults.defaults.guidance_rescale == 0.7


@pytest.mark.parametrize(("model", "message"), [
    ({"family": "flux", "embedded": "tiny-flux", "defaults": {"guidance_rescale": 0.7}},
     r"defaults\.guidance_rescale: only sdxl models"),
    ({"embedded": "tiny-sdxl", "defaults": {"guidance_rescale": 1.5}},
     r"defaults\.guidance_rescale"),
    ({"embedded": "tiny-sdxl", "scheduler_options": {"rescale_betas_zero_snr": True},
      "defaults": {"scheduler": "PNDM"}}, r"defaults\.scheduler must be one of K_EULER"),
])
def test_config_errors_name_the_setting(model, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": [{"id": "a/b", **model}]})


def test_the_version_changes_with_a_rescale_and_zero_snr_and_stays_without(tmp_path):
    plain = ModelConfig(id="a/b", embedded="tiny-sdxl")
    unset = ModelConfig(id="a/b", embedded="tiny-sdxl", defaults={"guidance_rescale": 0})
    rescaled = ModelConfig(id="a/b", embedded="tiny-sdxl", defaults={"guidance_rescale": 0.7})
    zero_snr = ModelConfig(id="a/b", embedded="tiny-sdxl",
                           scheduler_options={"rescale_betas_zero_snr": True})
    ids = [version_id(m, tmp_path) for m in (plain, unset, rescaled, zero_snr)]
    assert ids[0] == ids[1] and len(set(ids)) == 3
