"""LoRA adapters on FLUX: slots in the tiny FLUX transformer, filled from the embedded demo
adapters (diffusers/PEFT layout over every default target, and kohya's sd-scripts layout
with BFL module names and alpha at half the rank). Diffusers' own `load_lora_weights`
is the reference for what an adapter must do to the image."""

import numpy as np
import pytest
import torch

from serve.adapters import AdapterCatalog, AdapterInvalid, AdapterSet
from serve.types import GenerationRequest
from tests.unit.test_engine import assert_same_pixels

REQUEST = {"model": "m", "prompt": "a red shoe", "width": 64, "height": 64,
           "num_inference_steps": 4, "guidance_scale": 3.5, "seed": 3,
           "scheduler": "FlowMatchEuler"}
BASE = AdapterSet()


@pytest.fixture(scope="module")
def demo(cache_dir):
    from deployments.tiny import TINY_FLUX_DEMO, ensure_demo_loras

    return ensure_demo_loras(TINY_FLUX_DEMO, cache_dir)


@pytest.fixture(scope="module")
def engine(tiny_flux_path, demo):
    from deployments.engines.flux import FluxEngine

    catalog = AdapterCatalog.scan([(demo, "flux", 1.0)]).entries
    return FluxEngine(tiny_flux_path, "float32", "cpu", adapters=catalog, max_adapters=2,
                      max_lora_rank=8)


def _image(engine, adapters=BASE):
    (images,) = engine.generate([GenerationRequest(**REQUEST, adapters=adapters)])
    return np.asarray(images[0]).astype(int)


def _diffusers_image(path, adapter_file):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(adapter_file), adapter_name="reference")
    image = pipe(prompt=REQUEST["prompt"], width=64, height=64, num_inference_steps=4,
                 guidance_scale=3.5, generator=[torch.Generator("cpu").manual_seed(3)],
                 max_sequence_length=_t5_tokens(pipe)).images[0]
    return np.asarray(image).astype(int)


def _t5_tokens(pipe) -> int:
    return min(512, pipe.tokenizer_2.model_max_length)


def test_demo_adapters_are_catalogued_with_their_layout(demo):
    entries = AdapterCatalog.scan([(demo, "flux", 1.0)]).entries
    assert {(e.name, e.rank, e.layout) for e in entries.values()} == {
        ("neon", 4, "peft"), ("film-grain", 8, "peft"), ("ink", 4, "kohya")}


@pytest.mark.parametrize("name", ["neon", "ink"])
def test_an_adapter_gives_exactly_the_pixels_of_diffusers_own_loading(engine, demo,
                                                                     tiny_flux_path, name):
    """The PEFT file covers all 17 default targets; the kohya one has fused qkv
    projections that diffusers splits into three, and alpha at half the rank. (Up to one
    level on a few pixels: which CPU kernels sum the products, in which order, differs
    between machines, and a value on a rounding boundary can land either side.)"""
    ours = _image(engine, AdapterSet.of([(name, 1.0)]))
    assert np.abs(ours - _image(engine)).mean() > 2  # it changes the image
    assert_same_pixels(ours, _diffusers_image(tiny_flux_path, demo / f"{name}.safetensors"))


def test_scale_zero_and_base_requests_are_the_base_model(engine):
    base = _image(engine)
    _image(engine, AdapterSet.of([("film-grain", 1.0)]))
    assert np.array_equal(_image(engine, AdapterSet.of([("neon", 0.0)])), base)
    assert np.array_equal(_image(engine), base)


def test_stacked_adapters_differ_from_each_alone_and_scale_matters(engine):
    neon, ink = (_image(engine, AdapterSet.of([(n, 1.0)])) for n in ("neon", "ink"))
    both = _image(engine, AdapterSet.of([("neon", 1.0), ("ink", 1.0)]))
    half = _image(engine, AdapterSet.of([("neon", 0.5)]))
    assert min(np.abs(both - neon).mean(), np.abs(both - ink).mean(),
               np.abs(half - neon).mean()) > 1


def test_the_least_recently_used_adapter_leaves_and_comes_back_the_same(engine):
    first = _image(engine, AdapterSet.of([("neon", 1.0)]))
    for name in ("ink", "film-grain"):
        engine.adapters.activate(AdapterSet.of([(name, 1.0)]))
    assert engine.adapters.loaded == ["ink", "film-grain"]
    assert np.array_equal(_image(engine, AdapterSet.of([("neon", 1.0)])), first)


def test_requests_with_different_adapters_share_one_call_with_their_own_images(engine):
    sets = [AdapterSet.of([("ink", 1.0)]), AdapterSet.of([("neon", 1.0), ("ink", 0.5)]), BASE]
    requests = [GenerationRequest(**{**REQUEST, "seed": seed}, adapters=adapters)
                for seed, adapters in enumerate(sets)]
    alone = [np.asarray(engine.generate([r])[0][0]).astype(int) for r in requests]
    together = [np.asarray(images[0]).astype(int) for images in engine.generate(requests)]
    for a, b in zip(alone, together):
        diff = np.abs(a - b)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    base = engine.generate([GenerationRequest(**{**REQUEST, "seed": 0})])[0][0]
    assert np.abs(alone[0] - np.asarray(base).astype(int)).mean() > 2  # ink changes it


@pytest.mark.parametrize("name", ["pixel-art", "sketch"])
def test_an_sdxl_adapter_is_refused_by_the_flux_slots(cache_dir, tiny_flux_path, name):
    """Whatever a folder's `base` says, an SDXL file cannot fill FLUX slots: 422, not 500."""
    from deployments.engines.flux import FluxEngine
    from deployments.tiny import TINY_SDXL_DEMO, ensure_demo_loras

    catalog = AdapterCatalog.scan([(ensure_demo_loras(TINY_SDXL_DEMO, cache_dir), "flux",
                                    1.0)]).entries
    engine = FluxEngine(tiny_flux_path, "float32", "cpu", adapters=catalog, max_adapters=1,
                        max_lora_rank=8)
    with pytest.raises(AdapterInvalid, match=name):
        engine.adapters.read(name)
