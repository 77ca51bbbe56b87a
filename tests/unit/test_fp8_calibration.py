"""Calibrated FP8 activations (speed.fp8_activations: calibrated) on CPU: one fixed input
scale per layer, taken from what a calibration run met, instead of one made at each call."""

import numpy as np
import pytest
import torch
from torch import nn

from deployments.engines.speed import (
    CALIBRATION_MARGIN,
    CALIBRATION_PROMPTS,
    CALIBRATION_STEPS,
    E4M3_MAX,
    Fp8Linear,
    calibrate_fp8,
)
from serve.config import SpeedConfig
from serve.types import GenerationRequest


def _rel(a, b):
    return (torch.linalg.vector_norm(a.double() - b.double())
            / torch.linalg.vector_norm(b.double())).item()


def _layers(per_row=True):
    torch.manual_seed(0)
    linears = [nn.Linear(64, 48), nn.Linear(48, 32)]
    return linears, nn.Sequential(Fp8Linear(linears[0], per_row), nn.GELU(),
                                  Fp8Linear(linears[1], per_row))


@pytest.mark.parametrize("per_row", [True, False])
def test_the_scale_is_the_largest_input_met_with_the_margin(per_row):
    linears, net = _layers(per_row)
    seen = [torch.randn(3, 64), torch.randn(5, 64)]
    seen[1][2, 7] = 9.0  # the largest magnitude any call brings
    fixed = calibrate_fp8(net, lambda: [net(x) for x in seen])
    assert fixed == 2 and all(m.observed is None for m in (net[0], net[2]))
    assert net[0].input_scale.item() == pytest.approx(9.0 * CALIBRATION_MARGIN / E4M3_MAX)
    hidden = torch.cat([nn.functional.gelu(net[0](x)) for x in seen]).abs().max()
    assert net[2].input_scale.item() == pytest.approx(
        hidden.item() * CALIBRATION_MARGIN / E4M3_MAX, rel=1e-6)
    # Inputs in the calibrated range: as close to the float layer as scaling each call.
    for x in (torch.randn(4, 64), torch.randn(4, 64) * 2):
        calibrated, ref = net[0](x), linears[0](x)
        assert 1e-4 < _rel(calibrated, ref) < 0.08


def test_the_fixed_scale_is_the_product_of_the_quantized_input():
    _, net = _layers()
    calibrate_fp8(net, lambda: net(torch.full((2, 64), 4.0)))
    scale = net[0].input_scale
    x = torch.randn(6, 64)
    q = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    w = net[0].weight.float() * net[0].weight_scale.t()
    expected = q @ w.t() + net[0].bias.float()
    assert torch.allclose(net[0](x).float(), expected, rtol=0.02, atol=0.02)
    # Larger than the calibrated range: clipped to e4m3's largest value, never inf or NaN.
    huge = torch.zeros(1, 64)
    huge[0, 3] = 1e6
    out = net[0](huge)
    assert torch.isfinite(out).all()
    clipped = torch.zeros(1, 64)
    clipped[0, 3] = (scale * E4M3_MAX).item()  # 8: the margin over 4
    assert torch.allclose(out, net[0](clipped))


def test_layers_the_run_did_not_reach_keep_scaling_each_call():
    _, net = _layers()
    assert calibrate_fp8(net, lambda: net[0](torch.randn(2, 64))) == 1
    assert net[0].input_scale is not None and net[2].input_scale is None
    # The uncalibrated layer scales each call: a row of tiny values keeps its precision.
    tiny = torch.randn(2, 48) * 1e-4
    ref = nn.functional.linear(tiny, net[2].weight.float() * net[2].weight_scale.t(),
                               net[2].bias.float())
    assert _rel(net[2](tiny), ref) < 0.08


def test_calibration_runs_compiled_blocks_uncompiled_and_they_compile_after():
    _, net = _layers()
    compiled = torch.compile(net)
    x = torch.randn(4, 64)
    calibrate_fp8(net, lambda: compiled(x * 3))
    assert net[0].input_scale.item() == pytest.approx(
        (x * 3).abs().max().item() * CALIBRATION_MARGIN / E4M3_MAX)
    torch.testing.assert_close(compiled(x), net(x), rtol=1e-3, atol=1e-3)


def _req(seed, **overrides):
    base = {"model": "a/b", "prompt": "a red cube", "width": 64, "height": 64,
            "num_inference_steps": 3, "guidance_scale": 7.5, "seed": seed,
            "scheduler": "K_EULER"}
    return GenerationRequest(**{**base, **overrides})


def test_the_engine_calibrates_once_at_warm_up_on_the_calibration_prompts(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    plain = SDXLEngine(tiny_sdxl_path, "float32", "cpu")
    fp8 = SDXLEngine(tiny_sdxl_path, "float32", "cpu", speed=SpeedConfig(
        fp8=True, fp8_activations="calibrated"))
    layers = [m for m in fp8.pipe.unet.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.input_scale is None for m in layers)
    calls = []
    hook = fp8.pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    fp8.warm_up(_req(0, num_inference_steps=2), max_images=2)
    hook.remove()
    # A calibration call of each prompt (guided: two rows) at 20 steps, then the warm-up's
    # own calls of 1 and 2 images at 2 steps.
    assert calls == [2] * CALIBRATION_STEPS * len(CALIBRATION_PROMPTS) + [2, 2, 4, 4]
    assert fp8.describe()["speed"]["fp8_calibrated_layers"] == len(layers)
    scales = [m.input_scale.clone() for m in layers]
    fp8.warm_up(_req(0, num_inference_steps=2), max_images=2)  # a second warm-up keeps them
    assert all(torch.equal(a, m.input_scale) for a, m in zip(scales, layers, strict=True))
    a, b = plain.generate([_req(9)])[0][0], fp8.generate([_req(9)])[0][0]
    diff = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
    other = np.abs(np.asarray(a).astype(int)
                   - np.asarray(plain.generate([_req(10)])[0][0]).astype(int))
    assert 0 < diff.mean() < 8 and other.mean() > 4 * diff.mean(), diff.mean()
