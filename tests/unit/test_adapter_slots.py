"""Adapter slots on the tiny model's real pipeline, with the embedded demo adapters."""

import numpy as np
import pytest

from serve.adapters import AdapterCatalog, AdapterInvalid, AdapterSet
from serve.types import GenerationRequest


@pytest.fixture(scope="module")
def engine(tiny_sdxl_path, cache_dir):
    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_SDXL_DEMO, ensure_demo_loras

    folder = ensure_demo_loras(TINY_SDXL_DEMO, cache_dir)
    catalog = AdapterCatalog.scan([(folder, "sdxl", 1.0)]).entries
    return SDXLEngine(tiny_sdxl_path, "float32", "cpu", adapters=catalog, max_adapters=2,
                      max_lora_rank=8)


def _image(engine, adapters=AdapterSet()):
    (images,) = engine.generate([GenerationRequest(
        model="m", prompt="a cat", width=64, height=64, num_inference_steps=2,
        guidance_scale=7.5, seed=3, scheduler="K_EULER", adapters=adapters)])
    return np.asarray(images[0]).astype(int)


def test_loading_a_third_adapter_evicts_the_least_recently_used(engine):
    for name in ("pixel-art", "watercolor", "sketch"):
        engine.adapters.activate(AdapterSet.of([(name, 1.0)]))
    assert engine.adapters.loaded == ["watercolor", "sketch"]


def test_an_evicted_adapter_comes_back_with_the_same_pixels(engine):
    first = _image(engine, AdapterSet.of([("pixel-art", 1.0)]))
    _image(engine, AdapterSet.of([("watercolor", 1.0)]))
    _image(engine, AdapterSet.of([("sketch", 1.0)]))  # pixel-art leaves its slot
    assert "pixel-art" not in engine.adapters.loaded
    assert np.array_equal(_image(engine, AdapterSet.of([("pixel-art", 1.0)])), first)


def test_base_requests_are_untouched_by_held_adapters(engine):
    base = _image(engine)
    _image(engine, AdapterSet.of([("sketch", 1.0)]))
    assert np.array_equal(_image(engine), base)


def test_a_set_larger_than_the_slots_is_refused(engine):
    with pytest.raises(AdapterInvalid, match="more adapters"):
        engine.adapters.activate(AdapterSet.of([("pixel-art", 1), ("sketch", 1),
                                                ("watercolor", 1)]))


def test_preparing_several_slots_warns_of_nothing(tiny_sdxl_path):
    """PEFT's warning about a second adapter is expected here, so it is not logged."""
    import warnings

    from diffusers import UNet2DConditionModel

    from deployments.adapters import AdapterSlots

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path / "unet")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        slots = AdapterSlots(unet, {}, 3, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    assert len(unet.peft_config) == 3 and slots.loaded == []
    assert [str(w.message) for w in seen if "peft_config" in str(w.message)] == []
