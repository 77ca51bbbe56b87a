"""LoRAs merged into a model's weights at load (`merged_loras`), on the tiny SDXL and FLUX
with their demo adapters (CPU): every request gets the pixels a request naming the adapter
at that scale gets, requests' own adapters come on top, the files in kohya's layout merge
too, and the config checks the files and pins them in the model's version."""

import shutil
from dataclasses import replace

import numpy as np
import pytest

from serve.adapters import AdapterCatalog, AdapterSet
from serve.config import ConfigError, ModelConfig, parse_config
from serve.types import GenerationRequest
from tests.unit.test_engine import _px, assert_same_pixels


def _req(family: str, **overrides) -> GenerationRequest:
    flux = family == "flux"
    return GenerationRequest(**{"model": "m", "prompt": "a cat", "width": 64, "height": 64,
                                "num_inference_steps": 4, "seed": 3,
                                "guidance_scale": 3.5 if flux else 7.5,
                                "scheduler": "FlowMatchEuler" if flux else "K_EULER",
                                **overrides})


@pytest.fixture(scope="module")
def sdxl_loras(cache_dir):
    from deployments.tiny import TINY_SDXL_DEMO, ensure_demo_loras

    return ensure_demo_loras(TINY_SDXL_DEMO, cache_dir)


@pytest.fixture(scope="module")
def flux_loras(cache_dir):
    from deployments.tiny import TINY_FLUX_DEMO, ensure_demo_loras

    return ensure_demo_loras(TINY_FLUX_DEMO, cache_dir)


def test_a_merged_sdxl_lora_gives_every_request_the_adapters_pixels(tiny_sdxl_path,
                                                                    sdxl_loras):
    """Merged at 0.8, sketch gives a plain request what a request naming sketch at 0.8 gets
    from LoRA slots; a request naming pixel-art gets both."""
    from deployments.engines.sdxl import SDXLEngine

    catalog = AdapterCatalog.scan([(sdxl_loras, "sdxl", 1.0)]).entries
    slots = SDXLEngine(tiny_sdxl_path, "float32", "cpu", adapters=catalog, max_lora_rank=8)
    merged = SDXLEngine(tiny_sdxl_path, "float32", "cpu", adapters=catalog, max_lora_rank=8,
                        merged_loras=[(sdxl_loras / "sketch.safetensors", 0.8)])
    assert merged.describe()["merged_loras"] == ("sketch.safetensors",)
    base, sketch = _req("sdxl"), AdapterSet.of([("sketch", 0.8)])
    ours = merged.generate([base])[0][0]
    # (merged, W + dW meets x in one product; in a slot, Wx + dWx: sums in another order)
    assert_same_pixels(ours, slots.generate([replace(base, adapters=sketch)])[0][0])
    assert np.abs(_px(ours) - _px(slots.generate([base])[0][0])).mean() > 1
    both = AdapterSet.of([("sketch", 0.8), ("pixel-art", 1.0)])
    assert_same_pixels(merged.generate([replace(base, adapters=AdapterSet.of([
        ("pixel-art", 1.0)]))])[0][0], slots.generate([replace(base, adapters=both)])[0][0])


@pytest.mark.parametrize("name", ["neon", "ink"])  # PEFT's layout, kohya's
def test_a_merged_flux_lora_gives_every_request_the_adapters_pixels(tiny_flux_path,
                                                                    flux_loras, name):
    from deployments.engines.flux import FluxEngine

    catalog = AdapterCatalog.scan([(flux_loras, "flux", 1.0)]).entries
    slots = FluxEngine(tiny_flux_path, "float32", "cpu", adapters=catalog, max_lora_rank=8)
    merged = FluxEngine(tiny_flux_path, "float32", "cpu",
                        merged_loras=[(flux_loras / f"{name}.safetensors", 1.2)])
    base = _req("flux")
    ours = merged.generate([base])[0][0]
    assert_same_pixels(ours, slots.generate([replace(base, adapters=AdapterSet.of(
        [(name, 1.2)]))])[0][0])
    assert np.abs(_px(ours) - _px(slots.generate([base])[0][0])).mean() > 1


def test_the_config_checks_merged_loras_and_the_version_pins_them(tmp_path, sdxl_loras,
                                                                  cache_dir):
    from deployments.engines import create_engine
    from serve.versions import version_id

    copy = tmp_path / "lightning.safetensors"
    shutil.copy(sdxl_loras / "sketch.safetensors", copy)

    def model(*loras):
        return ModelConfig(id="a/b", embedded="tiny-sdxl",
                           merged_loras=[{"path": path, "scale": s} for path, s in loras])

    plain, one = model(), model((copy, 1.0))
    versions = {version_id(m, tmp_path) for m in (plain, one, model((copy, 0.5)))}
    copy.write_bytes(copy.read_bytes()[:-4] + b"\0\0\0\0")
    versions.add(version_id(one, tmp_path))
    assert len(versions) == 4
    with pytest.raises(ConfigError, match=r"models\.0\.merged_loras\.0\.path: .*missing"):
        parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl", "merged_loras": [
            {"path": str(tmp_path / "missing.safetensors")}]}]}).check_paths()
    with pytest.raises(ConfigError, match=r"merged_loras\.0\.scale"):
        parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl", "merged_loras": [
            {"path": str(copy), "scale": 9}]}]})
    shutil.copy(sdxl_loras / "sketch.safetensors", copy)
    engine = create_engine(model((copy, 0.8)), cache_dir, None)
    assert engine.describe()["merged_loras"] == ("lightning.safetensors",)
