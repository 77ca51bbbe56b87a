"""LoRA adapters on CUDA (skipped without a GPU): staged pinned copies, switches, scale 0,
merged adapters, in bf16 and in compiled FP8 layers."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from serve.adapters import AdapterCatalog, AdapterSet
from serve.types import GenerationRequest


@pytest.fixture(scope="module")
def engine(tiny_sdxl_path, cache_dir):
    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_SDXL_DEMO, ensure_demo_loras

    catalog = AdapterCatalog.scan([(ensure_demo_loras(TINY_SDXL_DEMO, cache_dir), "sdxl", 1.0)])
    return SDXLEngine(tiny_sdxl_path, "float16", "cuda", adapters=catalog.entries,
                      max_adapters=2, max_lora_rank=8)


def _image(engine, adapters=None):
    (images,) = engine.generate([GenerationRequest(
        model="m", prompt="a cat", width=128, height=128, num_inference_steps=3,
        guidance_scale=7.5, seed=3, scheduler="K_EULER", adapters=adapters or AdapterSet())])
    return np.asarray(images[0]).astype(int)


def test_staged_adapter_tensors_are_pinned_and_in_half_precision(engine):
    staged = engine.adapters.read("watercolor")
    a, b, _ = next(iter(staged.layers.values()))
    assert a.is_pinned() and a.dtype == torch.float16 and b.is_pinned()


def test_adapters_change_the_gpu_image_and_scale_zero_gives_the_base(engine):
    base = _image(engine)
    styled = _image(engine, AdapterSet.of([("pixel-art", 1.0)]))
    zero = _image(engine, AdapterSet.of([("pixel-art", 0.0)]))
    assert np.abs(styled - base).mean() > 1 and np.array_equal(zero, base)


def test_switching_back_and_forth_reproduces_each_adapter(engine):
    a1 = _image(engine, AdapterSet.of([("pixel-art", 1.0)]))
    _image(engine, AdapterSet.of([("sketch", 1.0)]))
    _image(engine, AdapterSet.of([("watercolor", 1.0)]))  # evicts pixel-art
    assert np.array_equal(_image(engine, AdapterSet.of([("pixel-art", 1.0)])), a1)


def test_merged_adapters_on_the_gpu_match_slots_and_restore_the_base(engine, tiny_sdxl_path,
                                                                     cache_dir):
    """fp16 weights with the adapter merged in round differently from the separate
    low-rank product: close images, and the base weights come back bit for bit."""
    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_SDXL_DEMO, ensure_demo_loras

    catalog = AdapterCatalog.scan([(ensure_demo_loras(TINY_SDXL_DEMO, cache_dir), "sdxl", 1.0)])
    merged = SDXLEngine(tiny_sdxl_path, "float16", "cuda", adapters=catalog.entries,
                        max_adapters=2, max_lora_rank=8, fuse_adapters=True)
    weights = {n: p.detach().clone() for n, p in merged.pipe.unet.named_parameters()}
    base = _image(merged)
    for adapters in (AdapterSet.of([("pixel-art", 1.0)]),
                     AdapterSet.of([("watercolor", 0.8), ("sketch", 1.0)])):
        diff = np.abs(_image(merged, adapters) - _image(engine, adapters))
        assert diff.mean() < 1, (adapters.key, diff.mean(), diff.max())
    assert np.array_equal(_image(merged), base)
    assert all(torch.equal(p, weights[n]) for n, p in merged.pipe.unet.named_parameters())



def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def test_merged_adapters_run_in_compiled_fp8_layers_and_restore_them(tiny_sdxl_path,
                                                                     cache_dir, tmp_path):
    """bf16 with fused projections, FP8 and compiled blocks: an adapter changes the image,
    and the empty set brings back the base FP8 weights bit for bit, and the base image."""
    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_SDXL_DEMO, ensure_demo_loras
    from serve.config import SpeedConfig

    catalog = AdapterCatalog.scan([(ensure_demo_loras(TINY_SDXL_DEMO, cache_dir), "sdxl", 1.0)])
    fast = SDXLEngine(tiny_sdxl_path, "bfloat16", "cuda", adapters=catalog.entries,
                      max_adapters=2, max_lora_rank=8, fuse_adapters=True,
                      speed=SpeedConfig(fuse_qkv=True, fp8=True, compile=True),
                      compile_cache=tmp_path)
    assert fast.describe()["speed"]["fp8_linears"] > 0
    buffers = {n: b.clone() for n, b in fast.pipe.unet.named_buffers()}
    base = _image(fast)
    assert np.abs(_image(fast, AdapterSet.of([("pixel-art", 1.0)])) - base).mean() > 1
    assert np.array_equal(_image(fast), base)
    assert all(torch.equal(_bits(b), _bits(buffers[n]))
               for n, b in fast.pipe.unet.named_buffers())


def test_slots_in_compiled_fp8_layers_share_calls_between_adapter_sets(tiny_sdxl_path,
                                                                       cache_dir, tmp_path):
    """bf16 with fused projections, FP8 and compiled blocks, adapters in slots: each
    request of a call with different sets gets about the image it gets alone."""
    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_SDXL_DEMO, ensure_demo_loras
    from serve.config import SpeedConfig

    catalog = AdapterCatalog.scan([(ensure_demo_loras(TINY_SDXL_DEMO, cache_dir), "sdxl", 1.0)])
    fast = SDXLEngine(tiny_sdxl_path, "bfloat16", "cuda", adapters=catalog.entries,
                      max_adapters=2, max_lora_rank=8,
                      speed=SpeedConfig(fuse_qkv=True, fp8=True, compile=True),
                      compile_cache=tmp_path)
    sets = [AdapterSet.of([("pixel-art", 1.0)]), AdapterSet(), AdapterSet.of([("sketch", 1.0)])]
    requests = [GenerationRequest(model="m", prompt="a cat", width=128, height=128,
                                  num_inference_steps=3, guidance_scale=7.5, seed=3,
                                  scheduler="K_EULER", adapters=s) for s in sets]
    alone = [np.asarray(fast.generate([r])[0][0]).astype(int) for r in requests]
    together = [np.asarray(images[0]).astype(int) for images in fast.generate(requests)]
    assert np.abs(alone[0] - alone[1]).mean() > 1  # same seed: the adapter made the change
    for a, b in zip(alone, together):
        assert np.abs(a - b).mean() < 1
