"""An ESRGAN upscaler on CUDA in half precision (skipped without a GPU): the upscaled
images of the float32 CPU network within a few 8-bit levels on average, and a hires pass
through it that draws the requested size."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from serve.types import GenerationRequest


@pytest.fixture(scope="module")
def esrgan_file(cache_dir):
    from deployments.tiny import TINY_ESRGAN, TINY_ESRGAN_FILE, ensure_embedded

    return ensure_embedded(TINY_ESRGAN, cache_dir) / TINY_ESRGAN_FILE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_upscales_as_float32_does(esrgan_file, dtype):
    from deployments.engines.upscalers import load_upscaler, upscaled

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    cpu = upscaled(load_upscaler(esrgan_file, "cpu", torch.float32), images, (96, 96))
    gpu = upscaled(load_upscaler(esrgan_file, "cuda", dtype), images.cuda(), (96, 96))
    assert gpu.dtype == torch.float32 and gpu.shape == (2, 3, 96, 96)
    assert (gpu.cpu() - cpu).abs().mean() < 8 / 255


def test_a_hires_pass_through_the_upscaler_runs_on_the_gpu(tiny_sdxl_path, esrgan_file):
    from deployments.engines.sdxl import SDXLEngine
    from deployments.engines.upscalers import UpscalerFile

    engine = SDXLEngine(tiny_sdxl_path, "float16", "cuda",
                        upscalers={"esrgan": UpscalerFile(esrgan_file)})
    request = GenerationRequest(model="a/b", prompt="a castle", width=128, height=128,
                                num_inference_steps=4, guidance_scale=6.0, seed=3,
                                scheduler="K_EULER", hires_scale=1.5, hires_upscaler="esrgan")
    (image,), = engine.generate([request])
    assert image.size == (192, 192)
    assert engine.describe()["upscalers"] == {"esrgan": "x4"}
