"""Speed settings on the tiny model (CPU): the same function, computed another way."""

import numpy as np
import pytest
import torch
from torch import nn

from deployments.engines.speed import E4M3_MAX, Fp8Linear, to_fp8
from serve.config import ConfigError, SpeedConfig, parse_config
from serve.types import GenerationRequest
from tests.compiled import compiled_run


def _req(seed, **overrides):
    base = {"model": "a/b", "prompt": "a red cube", "width": 64, "height": 64,
            "num_inference_steps": 3, "guidance_scale": 7.5, "seed": seed,
            "scheduler": "K_EULER"}
    return GenerationRequest(**{**base, **overrides})


def _px(image):
    return np.asarray(image).astype(int)


def _rel(a, b):
    return (torch.linalg.vector_norm(a.double() - b.double())
            / torch.linalg.vector_norm(b.double())).item()


@pytest.fixture(scope="module")
def plain(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float32", "cpu")


@pytest.mark.parametrize("per_row", [True, False])
def test_fp8_linear_is_close_to_the_float_layer_on_fresh_inputs(per_row):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    fp8 = Fp8Linear(linear, per_row)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.shape == (48, 64)
    assert fp8.weight_scale.shape == ((1, 48) if per_row else ())
    for _ in range(3):
        x = torch.randn(2, 5, 64) * 3
        out, ref = fp8(x), linear(x)
        assert out.shape == ref.shape == (2, 5, 48) and out.dtype == x.dtype
        err = _rel(out, ref)
        # e4m3 keeps 3 mantissa bits: a few percent, never exact, never NaN.
        assert 1e-4 < err < 0.08, err
        assert torch.isfinite(out).all()


def test_fp8_linear_adds_the_bias_inside_the_product():
    torch.manual_seed(2)
    linear = nn.Linear(32, 16)
    with torch.no_grad():
        linear.bias.copy_(torch.linspace(-4, 4, 16))
    unbiased = nn.Linear(32, 16, bias=False)
    unbiased.weight = linear.weight
    fp8, fp8_unbiased = Fp8Linear(linear), Fp8Linear(unbiased)
    assert fp8.bias.dtype == torch.bfloat16 and fp8_unbiased.bias is None
    x = torch.randn(3, 32)
    out = fp8(x)
    assert _rel(out, linear(x)) < 0.05
    # The same product, with the bias added to each row to within bf16's rounding.
    added = out - fp8_unbiased(x)
    assert torch.allclose(added, linear.bias.detach().expand(3, 16), atol=0.05)


def test_fp8_linear_keeps_rows_with_different_ranges_apart():
    """Per-row scales: a row of tiny activations is not flushed by a row of large ones.
    One scale per tensor is what `fp8_scaling: tensor` trades away."""
    torch.manual_seed(1)
    linear = nn.Linear(32, 16, bias=False)
    x = torch.stack([torch.randn(32) * 1e-3, torch.randn(32) * 1e3])
    out, ref = Fp8Linear(linear)(x), linear(x)
    for row in range(2):
        assert _rel(out[row], ref[row]) < 0.08
    out = Fp8Linear(linear, per_row=False)(x)
    assert _rel(out[1], ref[1]) < 0.08
    assert _rel(out[0], ref[0]) > 0.5  # below e4m3's smallest step at the large row's scale


def test_fp8_rows_set_again_change_only_those_rows_and_come_back_bit_for_bit():
    """`set_rows` (merged adapters): per row, the rows set get scales of their own and the
    others keep theirs; per tensor, the scale stays and values past it are clipped."""
    torch.manual_seed(2)
    linear = nn.Linear(32, 48)
    for per_row in (True, False):
        fp8 = Fp8Linear(linear, per_row)
        weight, scale = fp8.weight.view(torch.uint8).clone(), fp8.weight_scale.clone()
        rows = slice(16, 32)
        bigger = linear.weight.detach()[rows] * 3 + torch.randn(16, 32) * 0.05
        fp8.set_rows(rows, bigger)
        changed = (fp8.weight.view(torch.uint8) != weight).any(dim=1)
        assert changed[rows].all() and not changed[:16].any() and not changed[32:].any()
        dequantized = fp8.weight[rows].float() * (fp8.weight_scale[:, rows].t() if per_row
                                                  else fp8.weight_scale)
        if per_row:
            assert torch.equal(fp8.weight_scale[:, :16], scale[:, :16])
            assert torch.allclose(fp8.weight_scale[:, rows],
                                  bigger.abs().amax(dim=1) / E4M3_MAX)
            assert _rel(dequantized, bigger) < 0.05
        else:
            assert torch.equal(fp8.weight_scale, scale)
            assert dequantized.abs().max() == E4M3_MAX * scale  # clipped at the old scale
        fp8.set_rows(rows, linear.weight.detach()[rows])
        assert torch.equal(fp8.weight.view(torch.uint8), weight)
        assert torch.equal(fp8.weight_scale, scale)


def test_casting_a_model_keeps_its_fp8_layers_as_they_are():
    """`.to(dtype)` and `.half()` cast the float layers around an FP8 layer and leave its
    FP8 weights, float32 scales and bf16 bias, so it computes exactly what it did."""
    import copy

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 32), Fp8Linear(nn.Linear(32, 16)))
    uncast = copy.deepcopy(model[1])
    before = {name: t.clone() for name, t in model[1].state_dict().items()}
    model.to(torch.float16)
    assert model[0].weight.dtype == torch.float16
    for name, t in model[1].state_dict().items():
        assert t.dtype == before[name].dtype and torch.equal(
            t.view(torch.uint8), before[name].view(torch.uint8)), name
    h = torch.randn(4, 32, dtype=torch.float16)
    assert model[1](h).dtype == torch.float16 and torch.equal(model[1](h), uncast(h))
    model.half().to("cpu")
    assert model[1].weight.dtype == torch.float8_e4m3fn


def test_fp8_tensor_scaling_is_a_setting_of_fp8(tiny_sdxl_path, plain):
    from deployments.engines.sdxl import SDXLEngine

    for setting in ({"fp8_scaling": "tensor"}, {"fp8_fast_accum": False},
                    {"fp8_activations": "calibrated"}):
        with pytest.raises(ValueError, match="fp8_activations apply only with fp8"):
            SpeedConfig(**setting)
    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu", speed=SpeedConfig(
        fp8=True, fp8_scaling="tensor", fp8_fast_accum=False))
    layers = [m for m in engine.pipe.unet.modules() if isinstance(m, Fp8Linear)]
    assert engine.describe()["speed"]["fp8_scaling"] == "tensor"
    assert engine.describe()["speed"]["fp8_fast_accum"] is False
    assert layers and all(m.weight_scale.dim() == 0 and not m.fast_accum for m in layers)
    a, b = plain.generate([_req(9)])[0][0], engine.generate([_req(9)])[0][0]
    diff = np.abs(_px(a) - _px(b))
    assert 0 < diff.mean() < 8, diff.mean()
    assert np.abs(_px(a) - _px(plain.generate([_req(10)])[0][0])).mean() > 4 * diff.mean()


def test_only_transformer_block_linears_that_fit_become_fp8(tiny_sdxl_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path / "unet")
    expected = sum(1 for block in unet.modules()
                   if type(block).__name__ == "BasicTransformerBlock"
                   for m in block.modules() if type(m) is nn.Linear and Fp8Linear.fits(m))
    time_linears = [m for m in unet.time_embedding.modules() if type(m) is nn.Linear]
    assert expected > 0
    assert to_fp8(unet) == expected
    assert sum(isinstance(m, Fp8Linear) for m in unet.modules()) == expected
    assert all(type(m) is nn.Linear for m in unet.time_embedding.modules()
               if isinstance(m, nn.Linear)) and time_linears


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_fused_qkv_and_channels_last_and_compile_keep_the_pixels(tiny_sdxl_path, plain,
                                                                 tmp_path, mode):
    from deployments.engines.sdxl import SDXLEngine

    fast = SDXLEngine(tiny_sdxl_path, "float32", "cpu", compile_cache=tmp_path / "compile",
                      speed=SpeedConfig(fuse_qkv=True, channels_last=True, compile=True,
                                        compile_mode=mode))
    assert fast.describe()["speed"]["compiled_blocks"] > 0
    assert fast.describe()["speed"].get("compile_mode", "default") == mode
    assert fast.describe()["speed"]["fused_qkv"] is True
    # The transformer models' input and output steps are compiled too, one per model.
    models = fast.describe()["speed"]["compiled_transformer_edges"]
    assert models == fast.describe()["speed"]["channels_last_transformer_outputs"] > 0
    # Two batch sizes and two image sizes run on the same compiled blocks.
    for reqs in ([_req(3)], [_req(4), _req(5, num_outputs=2)], [_req(6, width=128)]):
        ref, got = plain.generate(reqs), fast.generate(reqs)
        for a, b in zip([i for own in ref for i in own], [i for own in got for i in own]):
            diff = np.abs(_px(a) - _px(b))
            assert diff.max() <= 2 and (diff > 0).mean() < 0.02, (diff.max(), diff.mean())
    assert any((tmp_path / "compile").iterdir())  # the compiled code is kept on disk


def test_cudnn_benchmark_is_switched_on_for_the_process_and_keeps_the_pixels(
        tiny_sdxl_path, plain):
    from deployments.engines.sdxl import SDXLEngine

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        timed = SDXLEngine(tiny_sdxl_path, "float32", "cpu",
                           speed=SpeedConfig(cudnn_benchmark=True))
        assert torch.backends.cudnn.benchmark is True
        assert timed.describe()["speed"] == {"cudnn_benchmark": True}
        # On the CPU no cuDNN runs: the same pixels, bit for bit.
        assert np.array_equal(_px(timed.generate([_req(12)])[0][0]),
                              _px(plain.generate([_req(12)])[0][0]))
        SDXLEngine(tiny_sdxl_path, "float32", "cpu")  # another model leaves it as it is
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("attention, first", [("cudnn", "CUDNN_ATTENTION"),
                                              ("efficient", "EFFICIENT_ATTENTION")])
def test_the_attention_order_holds_for_the_call_only(tiny_sdxl_path, plain, attention, first):
    """The chosen kernel is tried first during each denoising step and PyTorch's own
    order comes back after the call. This CPU has neither kernel, so attention falls
    back to the same one as with auto: the same pixels."""
    from torch.nn.attention import SDPBackend

    from deployments.engines.sdxl import SDXLEngine

    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu", speed=SpeedConfig(attention=attention))
    assert engine.describe()["speed"]["attention"] == attention
    before = torch._C._get_sdp_priority_order()
    tried_first = []
    (images,) = engine.generate(
        [_req(3)], on_step=lambda step, total: tried_first.append(
            torch._C._get_sdp_priority_order()[0]))
    assert tried_first == [int(getattr(SDPBackend, first))] * 3
    assert torch._C._get_sdp_priority_order() == before
    assert np.array_equal(_px(images[0]), _px(plain.generate([_req(3)])[0][0]))


def test_fp8_images_stay_close_to_the_float_images(tiny_sdxl_path, plain):
    from deployments.engines.sdxl import SDXLEngine

    fp8 = SDXLEngine(tiny_sdxl_path, "float32", "cpu", speed=SpeedConfig(fp8=True))
    assert fp8.describe()["speed"]["fp8_linears"] > 0
    a, b = plain.generate([_req(9)])[0][0], fp8.generate([_req(9)])[0][0]
    diff = np.abs(_px(a) - _px(b))
    assert 0 < diff.mean() < 8, diff.mean()
    assert np.abs(_px(a) - _px(plain.generate([_req(10)])[0][0])).mean() > 4 * diff.mean()


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_fused_qkv_drops_the_projections_it_replaces_and_fp8_makes_only_running_layers(
        tiny_sdxl_path, plain):
    from deployments.engines.sdxl import SDXLEngine

    fused = SDXLEngine(tiny_sdxl_path, "float32", "cpu", speed=SpeedConfig(fuse_qkv=True))
    dropped = fused.describe()["speed"]["unfused_params_dropped"]
    # The fused layers hold exactly the weights of the projections they replace.
    assert dropped > 0 and _params(fused.pipe.unet) == _params(plain.pipe.unet)
    for block in fused.pipe.unet.modules():
        if type(block).__name__ == "BasicTransformerBlock":
            assert not hasattr(block.attn1, "to_q") and hasattr(block.attn1, "to_qkv")
            assert hasattr(block.attn2, "to_q") and not hasattr(block.attn2, "to_k")
    assert np.array_equal(_px(fused.generate([_req(3)])[0][0]),
                          _px(plain.generate([_req(3)])[0][0]))

    fp8 = SDXLEngine(tiny_sdxl_path, "float32", "cpu",
                     speed=SpeedConfig(fuse_qkv=True, fp8=True))
    calls = {name: 0 for name, m in fp8.pipe.unet.named_modules() if isinstance(m, Fp8Linear)}

    def count(name):
        return lambda *_: calls.update({name: calls[name] + 1})

    for name in calls:
        fp8.pipe.unet.get_submodule(name).register_forward_hook(count(name))
    assert len(calls) == fp8.describe()["speed"]["fp8_linears"] > 0
    fp8.generate([_req(3)])
    assert min(calls.values()) > 0, [n for n, c in calls.items() if c == 0]


@pytest.mark.parametrize("setting", ["compile", "fuse_qkv", "fp8"])
def test_settings_that_change_layers_take_lora_adapters_in_slots_or_merged(setting, tmp_path):
    model = {"id": "a/b", "path": str(tmp_path), "speed": {setting: True}}
    folders = [{"path": str(tmp_path), "base": "sdxl"}]
    for fuse in (False, True):
        config = parse_config({"models": [{**model, "fuse_adapters": fuse}],
                               "lora_folders": folders})
        assert config.models[0].speed.model_dump()[setting] is True


def test_warm_up_stops_at_the_first_batch_that_does_not_fit(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    drill = SDXLEngine(tiny_sdxl_path, "float32", "cpu", simulate_oom_above_images=2)
    calls = []
    generate = drill.generate

    def counting(requests, *args, **kwargs):
        calls.append(len(requests))
        return generate(requests, *args, **kwargs)

    drill.generate = counting
    drill.warm_up(_req(1), max_images=4)  # 1 and 2 fit; 4 raise the drill's OOM
    assert calls == [1, 2, 4]
    assert len(drill.generate([_req(2), _req(3)])[1]) == 1  # and it still serves


def test_batch_buckets_pad_calls_and_keep_each_images_pixels(tiny_sdxl_path, plain):
    from deployments.engines.sdxl import SDXLEngine

    padded = SDXLEngine(tiny_sdxl_path, "float32", "cpu",
                        speed=SpeedConfig(batch_buckets=[2, 4]))
    rows: list[int] = []
    hook = padded.pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True)
    try:
        (one,) = padded.generate([_req(5)])
        three = padded.generate([_req(6), _req(7, num_outputs=2)])
    finally:
        hook.remove()
    # Classifier-free guidance doubles the rows: 1 image → bucket 2, 3 images → bucket 4.
    assert set(rows[:3]) == {4} and set(rows[3:]) == {8}
    assert len(one) == 1 and [len(images) for images in three] == [1, 2]
    for got, want in ((one[0], plain.generate([_req(5)])[0][0]),
                      (three[1][1], plain.generate([_req(8)])[0][0])):
        diff = np.abs(_px(got) - _px(want))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # as in test_engine


def test_a_padded_call_stops_once_its_real_requests_are_withdrawn(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    padded = SDXLEngine(tiny_sdxl_path, "float32", "cpu", speed=SpeedConfig(batch_buckets=[4]))
    steps: list[int] = []
    out = padded.generate([_req(1, num_inference_steps=10)], withdrawn=lambda: {0},
                          on_step=lambda step, total: steps.append(step))
    assert out == [[]] and steps == [1]


def test_compile_mode_is_a_setting_of_compile():
    with pytest.raises(ValueError, match="compile_mode and compile_sizes apply only with compile"):
        SpeedConfig(compile_mode="max-autotune-no-cudagraphs")
    with pytest.raises(ValueError, match="compile_mode"):
        SpeedConfig(compile=True, compile_mode="reduce-overhead")  # CUDA graphs: not offered
    assert SpeedConfig(compile=True, compile_mode="max-autotune-no-cudagraphs").compile


def test_every_benchmark_variant_is_a_valid_speed_setting():
    from load.bench_models import VARIANTS

    speeds = {name: SpeedConfig(**speed) for name, (_, speed) in VARIANTS.items()}
    assert speeds["compiled-b8"].batch_buckets == [8] and speeds["compiled-b8"].compile
    assert speeds["compiled-fp8-b8"].fp8 and speeds["compiled-fp8-b8"].batch_buckets == [8]


def test_batch_buckets_must_ascend_and_hold_the_batch():
    with pytest.raises(ConfigError, match="ascending"):
        parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl",
                                  "speed": {"batch_buckets": [4, 2]}}]})
    with pytest.raises(ConfigError, match="must hold batching.max_batch_size"):
        parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl",
                                  "batching": {"max_batch_size": 8},
                                  "speed": {"batch_buckets": [1, 2, 4]}}]})


def test_warm_up_runs_every_bucket_up_to_the_largest_batch(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    padded = SDXLEngine(tiny_sdxl_path, "float32", "cpu",
                        speed=SpeedConfig(batch_buckets=[1, 2, 4, 8]))
    rows: list[int] = []
    hook = padded.pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True)
    padded.warm_up(_req(0, num_inference_steps=1), max_images=3)
    hook.remove()
    assert rows == [2, 4, 8]  # buckets 1, 2 and 4 (the one that holds 3), doubled by CFG


def test_each_batch_bucket_gets_its_own_room_of_compiled_graphs(tmp_path):
    """Compiled for exact shapes, every block variant is compiled again for each bucket:
    the recompile limits grow with the bucket count, so no block falls back to eager."""
    from deployments.engines.speed import compile_blocks

    class ResnetBlock2D(nn.Linear):  # named as a repeated block
        pass

    config = torch._dynamo.config
    net = nn.Sequential(ResnetBlock2D(4, 4), nn.ReLU(), ResnetBlock2D(4, 4))
    with config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        assert compile_blocks([net], tmp_path / "a", dynamic=False) == 2
        assert (config.recompile_limit, config.accumulated_recompile_limit) == (64, 256)
        compile_blocks([net], tmp_path / "b", dynamic=False, batch_sizes=4)
        assert (config.recompile_limit, config.accumulated_recompile_limit) == (256, 1024)


def test_static_compiled_code_runs_only_at_the_sizes_warmed_up(tiny_sdxl_path, plain,
                                                               compile_cache):
    """With buckets, compiled code is specialised to each image size: sizes listed in
    compile_sizes are compiled during the warm-up, and a call at any other size runs
    uncompiled (no compilation under load) with the plain engine's pixels."""
    from torch._dynamo.utils import counters

    from deployments.engines.sdxl import SDXLEngine

    with pytest.raises(ValueError, match="multiples of 8"):
        SpeedConfig(compile=True, compile_sizes=[[100, 64]])
    torch._dynamo.reset()  # only this engine's warm-up counts (see test_compiled_shapes)
    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu", compile_cache=compile_cache,
                        speed=SpeedConfig(compile=True, batch_buckets=[2],
                                          compile_sizes=[[96, 64]]))
    before = counters["stats"]["calls_captured"]
    engine.warm_up(_req(0, num_inference_steps=1), max_images=2)
    warmed = counters["stats"]["calls_captured"]
    assert warmed > before
    for req, compiled in ((_req(5, width=96), True), (_req(6, width=128), False),
                          (_req(7, width=64, height=128), False)):
        (images,), regions, captured = compiled_run(lambda r=req: engine.generate([r]))
        assert captured == 0 and (regions > 0) == compiled  # nothing compiled under load
        diff = np.abs(_px(images[0]) - _px(plain.generate([req])[0][0]))
        assert images[0].size == (req.width, req.height) and diff.max() <= 2


def test_a_padded_call_keeps_its_bucket_size_when_one_request_leaves(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    padded = SDXLEngine(tiny_sdxl_path, "float32", "cpu", speed=SpeedConfig(batch_buckets=[4]))
    rows: list[int] = []
    hook = padded.pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True)
    left: set[int] = set()
    out = padded.generate([_req(1, num_inference_steps=4), _req(2, num_inference_steps=4)],
                          withdrawn=lambda: left, on_step=lambda step, total: left.add(0))
    hook.remove()
    # Request 0 leaves after the first step; its rows run on (their images go nowhere), so
    # the UNet still sees the bucket at every step (4 images, doubled by CFG).
    assert rows == [8] * 4 and [len(images) for images in out] == [1, 1]


def test_flux_takes_the_same_speed_settings(tiny_flux_path, compile_cache):
    """FLUX's transformer: its double- and single-stream blocks compiled (with the VAE
    decoder's resnets), its attention projections fused, its block linears in FP8."""
    from deployments.engines.flux import FluxEngine

    def req(seed, **overrides):
        return GenerationRequest(**{"model": "a/flux", "prompt": "a red shoe", "width": 64,
                                    "height": 64, "num_inference_steps": 4,
                                    "guidance_scale": 3.5, "seed": seed,
                                    "scheduler": "FlowMatchEuler", **overrides})

    plain = FluxEngine(tiny_flux_path, "float32", "cpu")
    fast = FluxEngine(tiny_flux_path, "float32", "cpu", compile_cache=compile_cache,
                      speed=SpeedConfig(fuse_qkv=True, channels_last=True, compile=True))
    blocks = sum(type(m).__name__ in ("FluxTransformerBlock", "FluxSingleTransformerBlock",
                                      "ResnetBlock2D")
                 for root in (fast.pipe.transformer, fast.pipe.vae.decoder)
                 for m in root.modules())
    speed = dict(fast.describe()["speed"])
    dropped = speed.pop("unfused_params_dropped")
    assert speed == {"fused_qkv": True, "channels_last": True, "compiled_blocks": blocks}
    assert dropped > 0 and _params(fast.pipe.transformer) == _params(plain.pipe.transformer)
    requests = [req(4), req(5, num_outputs=2)]
    images = [[image for own in e.generate(requests) for image in own] for e in (plain, fast)]
    for a, b in zip(*images, strict=True):
        diff = np.abs(_px(a) - _px(b))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.02, (diff.max(), diff.mean())
    fp8 = FluxEngine(tiny_flux_path, "float32", "cpu", speed=SpeedConfig(fp8=True))
    linears = sum(isinstance(m, nn.Linear) and Fp8Linear.fits(m)
                  for block in plain.pipe.transformer.modules()
                  if type(block).__name__ in ("FluxTransformerBlock", "FluxSingleTransformerBlock")
                  for m in block.modules())
    assert fp8.describe()["speed"]["fp8_linears"] == linears > 0
    a, b = (_px(e.generate([req(9)])[0][0]) for e in (plain, fp8))
    other_seed = _px(plain.generate([req(10)])[0][0])
    # Measured: 0.13 levels on average, against 46 between two seeds.
    assert 0 < np.abs(a - b).mean() < np.abs(a - other_seed).mean() / 20
