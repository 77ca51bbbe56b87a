"""A real CUDA out-of-memory in a batch (skipped without a GPU): the process is capped,
with torch's per-process memory fraction, between what two and four images need."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from serve.errors import OutOfMemory
from serve.types import GenerationRequest


def _req(seed):
    return GenerationRequest(model="a/b", prompt="a vase", width=1024, height=1024,
                             num_inference_steps=2, guidance_scale=7.5, seed=seed,
                             scheduler="K_EULER")


def _peak(engine, n):
    torch.cuda.reset_peak_memory_stats()
    engine.generate([_req(s) for s in range(n)])
    return torch.cuda.max_memory_allocated()


def test_a_batch_past_the_gpu_memory_fails_cleanly_and_memory_returns(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    engine = SDXLEngine(tiny_sdxl_path, "float16", "cuda")
    baseline = torch.cuda.memory_allocated()
    one, two = _peak(engine, 1), _peak(engine, 2)
    cap = two + (two - one) // 2  # four images need about one + 3 x (two - one)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        with pytest.raises(OutOfMemory, match="4 image"):
            engine.generate([_req(s) for s in range(4)])
        assert torch.cuda.memory_allocated() == baseline
        assert [len(images) for images in engine.generate([_req(1), _req(2)])] == [1, 1]
        assert torch.cuda.memory_allocated() == baseline
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_a_replica_with_a_gpu_share_keeps_to_that_share_of_the_memory(cache_dir):
    """`gpu_share: 0.25`: the engine's process may allocate a fifth of the GPU's memory
    but not a third of it."""
    from deployments.engines import create_engine
    from serve.config import ModelConfig

    model = ModelConfig(id="a/b", embedded="tiny-sdxl", device="cuda", gpu_share=0.25)
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        create_engine(model, cache_dir, None)
        fifth = torch.empty(total // 5, dtype=torch.uint8, device="cuda")
        del fifth
        torch.cuda.empty_cache()
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(total // 3, dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
