"""Adapters merged into the weights (`fuse_adapters`) against adapters in LoRA slots, on
the tiny SDXL and FLUX (CPU, float32): the same images, the base model restored exactly,
plain linear layers throughout, compiled blocks that see each merged set, and the layers
fused QKV and FP8 leave: the same images with fused projections, and FP8 layers holding
exactly the quantized merged weights."""

import numpy as np
import pytest
import torch
from torch import nn

from serve.adapters import AdapterCatalog, AdapterInvalid, AdapterSet
from serve.config import FAMILIES, SpeedConfig
from serve.types import GenerationRequest

SDXL = {"model": "m", "prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 3,
        "guidance_scale": 7.5, "seed": 3, "scheduler": "K_EULER"}
FLUX = {"model": "m", "prompt": "a red shoe", "width": 64, "height": 64,
        "num_inference_steps": 4, "guidance_scale": 3.5, "seed": 3, "scheduler": "FlowMatchEuler"}
SDXL_SETS = [AdapterSet(), AdapterSet.of([("pixel-art", 1.0)]), AdapterSet.of([("sketch", 0.7)]),
             AdapterSet.of([("watercolor", 0.8), ("sketch", 1.0)]), AdapterSet()]


def _catalog(cache_dir, demo, base):
    from deployments.tiny import ensure_demo_loras

    return AdapterCatalog.scan([(ensure_demo_loras(demo, cache_dir), base, 1.0)]).entries


@pytest.fixture(scope="module")
def sdxl_pair(tiny_sdxl_path, cache_dir):
    from deployments.engines.sdxl import SDXLEngine

    catalog = _catalog(cache_dir, "tiny-sdxl-demo", "sdxl")
    return [SDXLEngine(tiny_sdxl_path, "float32", "cpu", adapters=catalog, max_adapters=2,
                       max_lora_rank=8, fuse_adapters=fuse) for fuse in (False, True)]


def _image(engine, adapters, request=SDXL):
    (images,) = engine.generate([GenerationRequest(**request, adapters=adapters)])
    return np.asarray(images[0]).astype(int)


def _close(a, b):
    diff = np.abs(a - b)
    return diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_merged_adapters_give_the_images_of_slots(sdxl_pair):
    slots, fused = sdxl_pair
    images = [(_image(slots, s), _image(fused, s)) for s in SDXL_SETS]
    for (a, b), adapters in zip(images, SDXL_SETS):
        assert _close(a, b), adapters.key
    assert np.abs(images[1][1] - images[0][1]).mean() > 2  # an adapter changes the image
    # After three different merged sets, the base model's pixels are exactly the first ones.
    assert np.array_equal(images[0][1], images[-1][1])


def test_the_base_weights_come_back_bit_for_bit(sdxl_pair):
    _, fused = sdxl_pair
    weights = {n: p.detach().clone() for n, p in fused.pipe.unet.named_parameters()}
    fused.adapters.activate(AdapterSet())
    rewrites = fused.adapters.rewrites
    fused.adapters.activate(AdapterSet.of([("watercolor", 1.0)]))
    fused.adapters.activate(AdapterSet.of([("watercolor", 1.0)]))  # already merged
    assert fused.adapters.rewrites == rewrites + 1
    changed = [n for n, p in fused.pipe.unet.named_parameters() if not torch.equal(p, weights[n])]
    assert changed and all(n.endswith(".weight") for n in changed)
    fused.adapters.activate(AdapterSet())
    assert all(torch.equal(p, weights[n]) for n, p in fused.pipe.unet.named_parameters())


def test_merged_adapters_leave_plain_linear_layers(sdxl_pair):
    from deployments.lora_slots import SlotLinear

    slots, fused = sdxl_pair
    assert any(isinstance(m, SlotLinear) for m in slots.pipe.unet.modules())
    assert not any(isinstance(m, SlotLinear) for m in fused.pipe.unet.modules())
    # The copy that restores the base: the attention projections the slots cover.
    wrapped = sum(m.base.weight.numel() * 4 for m in slots.pipe.unet.modules()
                  if isinstance(m, SlotLinear))
    assert fused.adapters.original_bytes == wrapped > 0
    assert (slots.describe()["adapters"], fused.describe()["adapters"]) == ("slots", "merged")


def test_merged_adapters_are_held_least_recently_used_first(sdxl_pair):
    _, fused = sdxl_pair
    for name in ("pixel-art", "watercolor", "sketch"):
        fused.adapters.activate(AdapterSet.of([(name, 1.0)]))
    assert fused.adapters.loaded == ["watercolor", "sketch"]
    with pytest.raises(AdapterInvalid, match="more adapters"):
        fused.adapters.activate(AdapterSet.of([("pixel-art", 1), ("sketch", 1),
                                               ("watercolor", 1)]))


def test_flux_merged_adapters_give_the_images_of_slots(tiny_flux_path, cache_dir):
    from deployments.engines.flux import FluxEngine

    catalog = _catalog(cache_dir, "tiny-flux-demo", "flux")
    slots, fused = (FluxEngine(tiny_flux_path, "float32", "cpu", adapters=catalog,
                               max_adapters=2, max_lora_rank=8, fuse_adapters=fuse)
                    for fuse in (False, True))
    for adapters in (AdapterSet.of([("ink", 1.0)]), AdapterSet.of([("neon", 0.6)]),
                     AdapterSet()):
        assert _close(_image(slots, adapters, FLUX), _image(fused, adapters, FLUX))


def test_compiled_blocks_run_each_merged_set(tiny_sdxl_path, cache_dir, sdxl_pair, compile_cache):
    """Compiled code reads the weights as they are at each call: switching sets after
    compilation changes the images as it does uncompiled."""
    from deployments.engines.sdxl import SDXLEngine

    _, fused = sdxl_pair
    compiled = SDXLEngine(tiny_sdxl_path, "float32", "cpu", compile_cache=compile_cache,
                          adapters=_catalog(cache_dir, "tiny-sdxl-demo", "sdxl"),
                          max_adapters=2, max_lora_rank=8, fuse_adapters=True,
                          speed=SpeedConfig(compile=True, channels_last=True))
    assert compiled.describe()["speed"]["compiled_blocks"] > 0
    for adapters in SDXL_SETS[:4]:
        a, b = _image(fused, adapters), _image(compiled, adapters)
        diff = np.abs(a - b)
        assert diff.max() <= 2 and (diff > 0).mean() < 0.02, (adapters.key, diff.max())


def _fast(engine_cls, path, catalog, speed):
    """A CPU engine with merged adapters and `speed`."""
    return engine_cls(path, "float32", "cpu", adapters=catalog, max_adapters=2,
                      max_lora_rank=8, fuse_adapters=True, speed=speed)


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _fp8_rows_hold_the_quantized_merged_weights(plain, fp8, targets) -> tuple[int, int]:
    """Every targeted layer of `plain` (float, unfused, adapters merged) is, in `fp8`,
    rows of an FP8 layer holding exactly its weights quantized, or of a float layer
    holding them; return how many of each."""
    from deployments.engines.speed import Fp8Linear, linear_rows
    from deployments.fused_adapters import targeted

    rows_of = linear_rows(fp8)
    checked, floats = 0, 0
    for path, linear in plain.named_modules():
        if not (isinstance(linear, nn.Linear) and targeted(path, targets)):
            continue
        layer, rows = rows_of[path]
        if not isinstance(layer, Fp8Linear):  # a size FP8 does not take
            assert torch.allclose(layer.weight[rows], linear.weight, atol=1e-6), path
            floats += 1
            continue
        expected = Fp8Linear(linear)
        assert torch.equal(_bits(layer.weight[rows]), _bits(expected.weight)), path
        assert torch.equal(layer.weight_scale[:, rows], expected.weight_scale), path
        checked += 1
    return checked, floats


def test_merged_adapters_reach_fused_qkv_rows_and_fp8_layers(tiny_sdxl_path, cache_dir,
                                                             sdxl_pair):
    from deployments.engines.sdxl import SDXLEngine
    from deployments.lora_slots import SlotLinear

    slots, fused = sdxl_pair
    wrapped = sum(isinstance(m, SlotLinear) for m in slots.pipe.unet.modules())
    catalog = _catalog(cache_dir, "tiny-sdxl-demo", "sdxl")
    qkv = _fast(SDXLEngine, tiny_sdxl_path, catalog, SpeedConfig(fuse_qkv=True))
    fp8 = _fast(SDXLEngine, tiny_sdxl_path, catalog, SpeedConfig(fuse_qkv=True, fp8=True))
    assert qkv.describe()["speed"]["unfused_params_dropped"] > 0
    base = {n: b.clone() for n, b in fp8.pipe.unet.named_buffers()}
    targets = FAMILIES["sdxl"].lora_targets
    fp8_images = []
    for adapters in SDXL_SETS[:4]:
        assert _close(_image(fused, adapters), _image(qkv, adapters)), adapters.key
        fp8_images.append(_image(fp8, adapters))
        # The layers hold the set both engines just ran.
        assert _fp8_rows_hold_the_quantized_merged_weights(
            fused.pipe.unet, fp8.pipe.unet, targets) == (wrapped, 0), adapters.key
    assert np.abs(fp8_images[1] - fp8_images[0]).mean() > 2  # the adapter runs in FP8
    fp8.adapters.activate(AdapterSet())
    assert all(torch.equal(_bits(b), _bits(base[n])) for n, b in fp8.pipe.unet.named_buffers())


def test_flux_merged_adapters_reach_fused_qkv_rows_and_fp8_layers(tiny_flux_path, cache_dir):
    from deployments.engines.flux import FluxEngine

    catalog = _catalog(cache_dir, "tiny-flux-demo", "flux")
    plain, qkv, fp8 = (_fast(FluxEngine, tiny_flux_path, catalog, speed) for speed in (
        SpeedConfig(), SpeedConfig(fuse_qkv=True), SpeedConfig(fuse_qkv=True, fp8=True)))
    targets = FAMILIES["flux"].lora_targets
    fp8_layers = fp8.describe()["speed"]["fp8_linears"]
    # Each FP8 layer computes one targeted layer or, fused, two or three; the output
    # projection after the last block stays float.
    for adapters in (AdapterSet.of([("ink", 1.0)]), AdapterSet.of([("neon", 0.6)]),
                     AdapterSet()):
        assert _close(_image(plain, adapters, FLUX), _image(qkv, adapters, FLUX))
        _image(fp8, adapters, FLUX)
        held, floats = _fp8_rows_hold_the_quantized_merged_weights(
            plain.pipe.transformer, fp8.pipe.transformer, targets)
        assert fp8_layers < held <= 3 * fp8_layers and floats == 1, (held, floats)
