"""The FP8 error program's parts: hooks that leave the call alone, and its summary."""

import numpy as np
import pytest
import torch
from torch import nn

from load.fp8_error import COMPUTED, LayerError, measure, summarize
from serve.types import GenerationRequest


def _req(seed):
    return GenerationRequest(model="a/b", prompt="a red cube", width=64, height=64,
                             num_inference_steps=2, guidance_scale=7.5, seed=seed,
                             scheduler="K_EULER")


def test_measuring_leaves_the_call_and_its_layers_as_they_were(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu")
    plain = engine.generate([_req(3)])[0][0]
    report, images = measure(engine, [_req(3)])
    assert np.array_equal(np.asarray(images[0][0]), np.asarray(plain))
    assert not any(m._forward_hooks for m in engine.pipe.unet.modules())
    assert report["layers"] == len(report["by_layer"]) > 0
    # The engine computes in float32 here: bfloat16's own rounding is what it adds.
    assert all(0 < e["bf16"] < e["fp8-row"] < 0.1 for e in report["by_layer"].values())
    # Scales calibrated on other prompts beforehand: FP8's error too, not a copy of the
    # row-wise one (a fixed scale per layer, not one per row of each call).
    calibrated = [e["fp8-row-calibrated"] for e in report["by_layer"].values()]
    assert all(0 < c < 0.15 for c in calibrated)
    assert calibrated != [e["fp8-row"] for e in report["by_layer"].values()]


def test_a_layer_error_is_the_norm_of_the_difference_over_the_reference():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    hook = LayerError(linear)
    x = torch.randn(4, 32)
    ref = linear(x)
    hook(linear, (x,), ref)
    hook(linear, (x,), ref)  # two calls: sums over both, the same ratio
    bf16 = nn.functional.linear(x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16())
    expected = (torch.linalg.vector_norm(bf16.float() - ref) / torch.linalg.vector_norm(ref))
    assert hook.relative()["bf16"] == pytest.approx(expected.item(), rel=1e-4)
    assert set(hook.relative()) == set(COMPUTED)


def test_the_summary_ranks_layers_and_compares_fp8_with_bfloat16():
    errors = {"a": {"bf16": 0.01, "fp8-row": 0.05, "fp8-row-slowaccum": 0.04, "fp8-tensor": 0.2,
                    "fp8-row-calibrated": 0.07},
              "b": {"bf16": 0.02, "fp8-row": 0.2, "fp8-row-slowaccum": 0.2, "fp8-tensor": 0.1,
                    "fp8-row-calibrated": 0.2},
              "c": {"bf16": 0.01, "fp8-row": 0.06, "fp8-row-slowaccum": 0.03, "fp8-tensor": 0.3,
                    "fp8-row-calibrated": 0.09}}
    s = summarize(errors, worst=2)["summary"]
    assert s["fp8-row"]["mean"] == pytest.approx(0.31 / 3)
    assert s["fp8-row"]["median"] == 0.06 and s["fp8-row"]["max"] == 0.2
    assert [w["layer"] for w in s["fp8-tensor"]["worst"]] == ["c", "a"]
    assert s["fp8-row"]["median_vs_bf16"] == pytest.approx(6.0)  # 5, 10 and 6
    assert "median_vs_bf16" not in s["bf16"]
    assert s["fp8-row-calibrated"]["median_vs_bf16"] == pytest.approx(9.0)  # 7, 10 and 9
