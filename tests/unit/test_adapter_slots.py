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


def _image(engine, adapters=None):
    (images,) = engine.generate([GenerationRequest(
        model="m", prompt="a cat", width=64, height=64, num_inference_steps=2,
        guidance_scale=7.5, seed=3, scheduler="K_EULER", adapters=adapters or AdapterSet())])
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


def _req(seed=3, adapters=None, **overrides):
    return GenerationRequest(**{"model": "m", "prompt": "a cat", "width": 64, "height": 64,
                                "num_inference_steps": 2, "guidance_scale": 7.5, "seed": seed,
                                "scheduler": "K_EULER", "adapters": adapters or AdapterSet(), **overrides})


def _assert_close(a, b):
    """Equal up to one 8-bit level on a few pixels (a batch sums in another order)."""
    diff = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, diff.max()


PIXEL, SKETCH = AdapterSet.of([("pixel-art", 1.0)]), AdapterSet.of([("sketch", 0.6)])


def test_requests_with_different_adapters_share_one_call_with_their_own_images(engine):
    requests = [_req(1, PIXEL), _req(2, SKETCH, num_outputs=2), _req(3), _req(4, PIXEL)]
    alone = [engine.generate([r])[0] for r in requests]
    together = engine.generate(requests)
    assert [len(images) for images in together] == [1, 2, 1, 1]
    for own, shared in zip(alone, together):
        for a, b in zip(own, shared):
            _assert_close(a, b)
    # The adapters do change the images they are asked for.
    base = engine.generate([_req(1)])[0][0]
    assert np.abs(np.asarray(base).astype(int) - np.asarray(alone[0][0])).mean() > 2


def test_a_call_may_not_name_more_adapters_than_the_slots_hold(engine):
    with pytest.raises(AdapterInvalid, match="more adapters"):
        engine.generate([_req(1, PIXEL), _req(2, SKETCH),
                         _req(3, AdapterSet.of([("watercolor", 1)]))])


def test_a_withdrawn_request_takes_its_adapter_rows_out_of_the_call(engine):
    requests = [_req(1, PIXEL, num_inference_steps=4), _req(2, num_inference_steps=4),
                _req(3, SKETCH, num_inference_steps=4)]
    untouched = engine.generate(requests)
    steps = []
    out = engine.generate(requests, withdrawn=lambda: {1} if len(steps) >= 2 else set(),
                          on_step=lambda s, t: steps.append(s))
    assert [len(images) for images in out] == [1, 0, 1]
    _assert_close(out[0][0], untouched[0][0])
    _assert_close(out[2][0], untouched[2][0])


def test_compiled_calls_pad_each_rows_adapters_up_to_a_few_counts():
    """Compiled, a row's adapters are padded with the all-zero slot up to a power of two
    or the capacity, so calls meet only the counts warm-up ran; uncompiled, a call runs
    at its own largest count."""
    import torch

    from deployments.engines.withdrawal import BatchRows
    from deployments.lora_slots import SlotRouting, slot_widths, wrap_targets

    assert [slot_widths(c) for c in (1, 2, 6, 8)] == [(1,), (1, 2), (1, 2, 4, 6),
                                                     (1, 2, 4, 8)]
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    layer, _ = wrap_targets(net, ["0"], slots=8, rank=2, dtype=torch.float32)["0"]
    routing = SlotRouting(8)
    routing.attach(net, {layer})
    placed = {}
    for widths in (slot_widths(8), ()):
        routing.widths = widths
        routing.route([[(0, 1.0), (1, 0.5), (2, 0.25)], []], BatchRows([1, 1]))
        net(torch.zeros(2, 4))
        placed[widths] = layer.slot_rows.tolist(), layer.slot_scales.tolist()
    assert placed[slot_widths(8)] == ([[0, 1, 2, 8], [8, 8, 8, 8]],
                                      [[1.0, 0.5, 0.25, 0.0], [0.0] * 4])
    assert placed[()] == ([[0, 1, 2], [8, 8, 8]], [[1.0, 0.5, 0.25], [0.0] * 3])


def test_slots_are_put_around_the_layers_fused_qkv_and_fp8_leave(tiny_sdxl_path, cache_dir):
    from deployments.engines.sdxl import SDXLEngine
    from deployments.engines.speed import Fp8Linear
    from deployments.lora_slots import SlotLinear
    from deployments.tiny import TINY_SDXL_DEMO, ensure_demo_loras
    from serve.config import SpeedConfig

    catalog = AdapterCatalog.scan([(ensure_demo_loras(TINY_SDXL_DEMO, cache_dir), "sdxl",
                                    1.0)]).entries
    plain, qkv, fp8 = (SDXLEngine(tiny_sdxl_path, "float32", "cpu", adapters=catalog,
                                  max_adapters=2, max_lora_rank=8, speed=speed)
                       for speed in (SpeedConfig(), SpeedConfig(fuse_qkv=True),
                                     SpeedConfig(fuse_qkv=True, fp8=True)))
    attention = qkv.pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert isinstance(attention.to_qkv, SlotLinear) and attention.to_qkv.parts == 3
    fp8_slots = [m for m in fp8.pipe.unet.modules()
                 if isinstance(m, SlotLinear) and isinstance(m.base, Fp8Linear)]
    assert fp8_slots
    requests = [_req(1, PIXEL), _req(2, SKETCH), _req(3)]
    images = [engine.generate(requests) for engine in (plain, qkv, fp8)]
    for a, b in zip(images[0], images[1]):
        _assert_close(a[0], b[0])
    fp8_base = fp8.generate([_req(1)])[0][0]
    assert np.abs(np.asarray(fp8_base).astype(int)
                  - np.asarray(images[2][0][0]).astype(int)).mean() > 2


def test_compiled_slots_switch_and_mix_sets_without_compiling_again(tiny_sdxl_path, cache_dir,
                                                                    engine, compile_cache):
    """Warm-up compiles the code of calls with one and with two adapters per request;
    after it, calls that switch, mix, stack or drop adapters reuse it, with the images
    uncompiled slots give."""
    from torch._dynamo.utils import counters

    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_SDXL_DEMO, ensure_demo_loras
    from serve.config import SpeedConfig

    catalog = AdapterCatalog.scan([(ensure_demo_loras(TINY_SDXL_DEMO, cache_dir), "sdxl",
                                    1.0)]).entries
    compiled = SDXLEngine(tiny_sdxl_path, "float32", "cpu", adapters=catalog, max_adapters=2,
                          max_lora_rank=8, compile_cache=compile_cache,
                          speed=SpeedConfig(compile=True, batch_buckets=[2]))
    compiled.warm_up(_req(0), max_images=2)
    graphs = counters["stats"]["unique_graphs"]
    both = AdapterSet.of([("pixel-art", 1.0), ("sketch", 0.5)])
    calls = [[_req(1, PIXEL)], [_req(1, SKETCH), _req(2)], [_req(1, PIXEL), _req(2, SKETCH)],
             [_req(1, both)], [_req(1, both), _req(2, PIXEL)], [_req(1)]]
    for requests in calls:
        for own, eager in zip(compiled.generate(requests), engine.generate(requests)):
            _assert_close(own[0], eager[0])
    assert counters["stats"]["unique_graphs"] == graphs > 0
