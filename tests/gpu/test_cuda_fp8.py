"""FP8 linear layers on CUDA's FP8 kernels (skipped without a GPU with FP8 matrix units)."""

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _FP8, reason="needs a CUDA GPU with FP8 (Ada, Hopper)")]

from torch import nn

from serve.types import GenerationRequest


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("fast_accum", [True, False])
def test_fp8_products_with_the_bias_match_bfloat16(per_row, fast_accum):
    """cuBLAS (per tensor) and CUTLASS (row-wise) take the bias and either accumulation;
    a row count off the kernels' tile sizes included."""
    from deployments.engines.speed import Fp8Linear

    torch.manual_seed(0)
    linear = nn.Linear(320, 640).to("cuda", torch.bfloat16)
    fp8 = Fp8Linear(linear, per_row, fast_accum)
    x = torch.randn(2, 333, 320, device="cuda", dtype=torch.bfloat16)
    out, ref = fp8(x), linear(x)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert 1e-4 < _rel(out, ref) < 0.08


def test_fp8_images_stay_close_to_bfloat16_on_the_gpu(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine
    from serve.config import SpeedConfig

    req = GenerationRequest(model="a/b", prompt="a red cube", width=128, height=128,
                            num_inference_steps=4, guidance_scale=7.5, seed=3,
                            scheduler="K_EULER")
    plain = SDXLEngine(tiny_sdxl_path, "bfloat16", "cuda")
    fp8 = SDXLEngine(tiny_sdxl_path, "bfloat16", "cuda", speed=SpeedConfig(fp8=True))
    assert fp8.describe()["speed"]["fp8_fast_accum"] is True
    a, b = (np.asarray(e.generate([req])[0][0]).astype(int) for e in (plain, fp8))
    other = np.asarray(plain.generate([replace(req, seed=4)])[0][0])
    assert 0 < np.abs(a - b).mean() < 8
    assert np.abs(a - other.astype(int)).mean() > 4 * np.abs(a - b).mean()


@pytest.mark.parametrize("per_row", [True, False])
def test_calibrated_fp8_products_match_bfloat16_compiled(per_row):
    """A fixed input scale (row-wise products repeat it per row), in compiled code: the
    quantization fused into the producing kernel computes what the eager layer does."""
    from deployments.engines.speed import Fp8Linear, calibrate_fp8

    torch.manual_seed(0)
    linear = nn.Linear(320, 640).to("cuda", torch.bfloat16)
    net = nn.Sequential(nn.GELU(), Fp8Linear(linear, per_row))
    x = torch.randn(2, 333, 320, device="cuda", dtype=torch.bfloat16)
    assert calibrate_fp8(net, lambda: net(x)) == 1
    compiled = torch.compile(net, dynamic=False)
    out, eager, ref = compiled(x), net(x), linear(nn.functional.gelu(x))
    assert torch.isfinite(out).all() and 1e-4 < _rel(out, ref) < 0.08
    assert _rel(out, eager) < 0.03


def test_calibrated_fp8_images_stay_close_to_bfloat16_on_the_gpu(tiny_sdxl_path, tmp_path):
    from deployments.engines.sdxl import SDXLEngine
    from serve.config import SpeedConfig

    req = GenerationRequest(model="a/b", prompt="a red cube", width=128, height=128,
                            num_inference_steps=4, guidance_scale=7.5, seed=3,
                            scheduler="K_EULER")
    plain = SDXLEngine(tiny_sdxl_path, "bfloat16", "cuda")
    fp8 = SDXLEngine(tiny_sdxl_path, "bfloat16", "cuda", speed=SpeedConfig(
        fp8=True, fp8_activations="calibrated", compile=True, batch_buckets=[1, 2]),
        compile_cache=tmp_path)
    fp8.warm_up(req, max_images=2)
    assert fp8.describe()["speed"]["fp8_calibrated_layers"] == fp8.describe()["speed"][
        "fp8_linears"]
    a, b = (np.asarray(e.generate([req])[0][0]).astype(int) for e in (plain, fp8))
    other = np.asarray(plain.generate([replace(req, seed=4)])[0][0])
    assert 0 < np.abs(a - b).mean() < 8
    assert np.abs(a - other.astype(int)).mean() > 4 * np.abs(a - b).mean()
