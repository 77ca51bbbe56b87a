"""The SDXL engine on CUDA (skipped without a GPU)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from serve.types import GenerationRequest


@pytest.fixture(scope="module")
def engine(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float16", "cuda")


def _req(seed, **overrides):
    base = {"model": "a/b", "prompt": "a red cube", "width": 128, "height": 128,
                "num_inference_steps": 4, "guidance_scale": 7.5, "seed": seed, "scheduler": "K_EULER"}
    return GenerationRequest(**{**base, **overrides})


def test_weights_run_in_half_precision_on_the_gpu(engine):
    facts = engine.describe()
    assert (facts["device"], facts["dtype"], facts["vae_scale_factor"]) == ("cuda", "float16", 8)
    assert next(engine.pipe.unet.parameters()).dtype == torch.float16
    engine.check()


def test_seeded_images_repeat_and_survive_batching_on_the_gpu(engine):
    a = np.asarray(engine.generate([_req(7)])[0][0]).astype(int)
    b = np.asarray(engine.generate([_req(7)])[0][0]).astype(int)
    batch = engine.generate([_req(6), _req(7), _req(8, num_outputs=2)])
    c = np.asarray(batch[1][0]).astype(int)
    assert np.array_equal(a, b)
    # fp16 kernels for batch 1 and batch 4 may differ by a rounding step.
    assert np.abs(a - c).max() <= 2 and (np.abs(a - c) > 0).mean() < 0.05


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_each_rows_guidance_scale_is_the_scalars_product_on_the_gpu(dtype):
    from deployments.engines.row_guidance import RowGuidance
    from deployments.engines.withdrawal import BatchRows

    torch.manual_seed(0)
    text, uncond = torch.randn(2, 3, 4, 32, 32, device="cuda").to(getattr(torch, dtype))
    mixed = RowGuidance([7.3, 4.1], BatchRows([2, 1]))
    guided = uncond + mixed * (text - uncond)
    assert torch.equal(guided[:2], uncond[:2] + 7.3 * (text[:2] - uncond[:2]))
    assert torch.equal(guided[2:], uncond[2:] + 4.1 * (text[2:] - uncond[2:]))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_each_row_is_rescaled_on_cuda_exactly_as_diffusers_rescales_it_alone(dtype):
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        rescale_noise_cfg,
    )

    from deployments.engines.row_guidance import call_rescale
    from deployments.engines.withdrawal import BatchRows

    torch.manual_seed(0)
    guided, text = torch.randn(2, 3, 4, 32, 32, device="cuda").to(getattr(torch, dtype))
    out = rescale_noise_cfg(guided, text, call_rescale([0.7, 0.0], BatchRows([2, 1])))
    assert torch.equal(out[:2], rescale_noise_cfg(guided[:2], text[:2], 0.7))
    assert torch.equal(out[2:], guided[2:])


def test_prompts_prepared_on_another_thread_during_a_gpu_call_give_the_same_pixels(engine):
    """The replica encodes prompts on its own thread while the pipeline thread denoises,
    both on the GPU: the embeddings must be complete before a later call uses them."""
    import threading

    from deployments.engines.prompts import PromptCache

    request, other = _req(31, prompt="a green vase"), _req(32, prompt="a steel bridge")
    expected = np.asarray(engine.generate([other])[0][0]).astype(int)
    engine.prompts = PromptCache(engine._encode_prompt)  # nothing held
    prepared = []
    thread = threading.Thread(target=lambda: prepared.append(engine.prepare(other)))
    thread.start()
    engine.generate([request])  # runs while the other thread encodes
    thread.join()
    (made, held), = prepared
    assert not held and made.embeds[0].device.type == "cuda"
    got = np.asarray(engine.generate([other], prepared=[made])[0][0]).astype(int)
    assert np.array_equal(expected, got)


@pytest.mark.parametrize("attention, kernel", [("cudnn", "cudnn"), ("flash", "flash")])
def test_the_chosen_attention_kernel_runs_and_keeps_the_image(engine, tiny_sdxl_path,
                                                              attention, kernel):
    """The profiler sees the chosen kernel among the call's attention kernels, and the
    image stays within rounding of PyTorch's own choice."""
    from deployments.engines.sdxl import SDXLEngine
    from load.profile_ops import op_breakdown
    from serve.config import SpeedConfig

    chosen = SDXLEngine(tiny_sdxl_path, "float16", "cuda",
                        speed=SpeedConfig(attention=attention))
    profile = op_breakdown(lambda: chosen.generate([_req(7)]), top=200)
    attention_kernels = [k["name"].lower() for k in profile["top"] if k["kind"] == "attention"]
    assert any(kernel in name for name in attention_kernels), attention_kernels
    a = np.asarray(chosen.generate([_req(7)])[0][0]).astype(int)
    b = np.asarray(engine.generate([_req(7)])[0][0]).astype(int)
    assert np.abs(a - b).mean() < 1


def test_convolutions_timed_by_cudnn_keep_the_image(engine, tiny_sdxl_path):
    """speed.cudnn_benchmark: cuDNN may choose other convolution algorithms, within
    rounding of its heuristics' choice."""
    from deployments.engines.sdxl import SDXLEngine
    from serve.config import SpeedConfig

    before = torch.backends.cudnn.benchmark
    try:
        timed = SDXLEngine(tiny_sdxl_path, "float16", "cuda",
                           speed=SpeedConfig(cudnn_benchmark=True))
        assert torch.backends.cudnn.benchmark is True
        a = np.asarray(timed.generate([_req(7)])[0][0]).astype(int)
    finally:
        torch.backends.cudnn.benchmark = before
    b = np.asarray(engine.generate([_req(7)])[0][0]).astype(int)
    assert np.abs(a - b).mean() < 1


def test_partial_images_decode_in_half_precision_and_leave_the_result_alone(engine):
    """The fp16 VAE is decoded in float32 when its config asks (as the pipeline does), and
    given back in float16 for the call's own decode."""
    plain = np.asarray(engine.generate([_req(9)])[0][0]).astype(int)
    got = []
    (images,) = engine.generate([_req(9, partial_images=3)],
                                on_preview=lambda i, ims: got.append(ims[0]))
    assert len(got) == 3 and all(im.size == (128, 128) for im in got)
    assert all(np.asarray(im).std() > 1 for im in got)  # not a black (NaN) frame
    assert np.abs(np.asarray(images[0]).astype(int) - plain).max() <= 2
    assert next(engine.pipe.vae.parameters()).dtype == torch.float16


def test_a_controlnet_runs_in_the_models_dtype_on_the_gpu(tiny_sdxl_path, cache_dir):
    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_SDXL_CONTROLNET, ensure_embedded
    from serve.types import ControlImage

    folder = ensure_embedded(TINY_SDXL_CONTROLNET, cache_dir)
    engine = SDXLEngine(tiny_sdxl_path, "bfloat16", "cuda", controlnets={"canny": (folder, None)})
    assert engine.describe()["weights"]["controlnet canny"] == "bfloat16"
    edges = np.zeros((128, 128, 3), np.uint8)
    edges[32:96, 32] = edges[32, 32:96] = 255
    control = (ControlImage("canny", edges.tobytes(), 1.0),)
    plain = np.asarray(engine.generate([_req(3)])[0][0]).astype(int)
    steered = engine.generate([_req(3, controls=control), _req(4, controls=control)])
    off = engine.generate([_req(3, controls=(ControlImage("canny", edges.tobytes(), 0.0),))])
    assert np.abs(np.asarray(steered[0][0]).astype(int) - plain).mean() > 3
    assert np.array_equal(np.asarray(off[0][0]).astype(int), plain)


def test_an_image_prompt_runs_in_the_models_dtype_on_the_gpu(tiny_sdxl_path, cache_dir):
    """The IP-Adapter's image encoder and attention in bfloat16, compiled and with fused
    QKV: a prompted image moves, one without a prompt in the same call keeps its pixels."""
    from dataclasses import replace

    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_SDXL_IP_ADAPTER, ensure_embedded
    from serve.config import SpeedConfig
    from serve.types import ImagePrompt

    folder = ensure_embedded(TINY_SDXL_IP_ADAPTER, cache_dir)
    engine = SDXLEngine(tiny_sdxl_path, "bfloat16", "cuda", speed=SpeedConfig(
        fuse_qkv=True, compile=True), compile_cache=cache_dir / "compile-gpu-ip",
        ip_adapter=(folder, "sdxl_models", "ip-adapter_sdxl.safetensors", "image_encoder"))
    assert engine.describe()["weights"]["ip-adapter image_encoder"] == "bfloat16"
    picture = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    prompt = ImagePrompt(picture.tobytes(), 80, 96, 1.0)
    plain = np.asarray(engine.generate([_req(3)])[0][0]).astype(int)
    both = engine.generate([replace(_req(3), image_prompt=prompt), _req(3)])
    assert np.abs(np.asarray(both[0][0]).astype(int) - plain).mean() > 2
    assert np.abs(np.asarray(both[1][0]).astype(int) - plain).max() <= 2


def test_exact_shapes_compile_nothing_under_load_on_the_gpu(tiny_sdxl_path, cache_dir):
    """Compiled for exact shapes on CUDA (bfloat16, buckets of 1 and 2) with an
    IP-Adapter: after the warm-up, two image-prompted images enter every compiled block,
    a mood board fewer, another size none, and none compiles anything."""
    from dataclasses import replace

    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_SDXL_IP_ADAPTER, ensure_embedded
    from serve.config import SpeedConfig
    from serve.types import ImagePrompt, Picture
    from tests.compiled import compiled_run

    folder = ensure_embedded(TINY_SDXL_IP_ADAPTER, cache_dir)
    engine = SDXLEngine(tiny_sdxl_path, "bfloat16", "cuda", speed=SpeedConfig(
        compile=True, batch_buckets=[1, 2]), compile_cache=cache_dir / "compile-gpu-exact",
        ip_adapter=(folder, "sdxl_models", "ip-adapter_sdxl.safetensors", "image_encoder"))
    engine.warm_up(_req(0, num_inference_steps=1), max_images=2)
    picture = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    prompt = ImagePrompt(picture.tobytes(), 80, 96, 0.7)
    board = replace(prompt, more=(Picture(picture[::-1].tobytes(), 80, 96),))
    _, full, captured = compiled_run(lambda: engine.generate(
        [replace(_req(1), image_prompt=prompt), replace(_req(2), image_prompt=prompt)]))
    assert full > 0 and captured == 0
    _, fewer, captured = compiled_run(lambda: engine.generate(
        [replace(_req(1), image_prompt=board)]))
    assert 0 < fewer < full and captured == 0
    _, none, captured = compiled_run(lambda: engine.generate([_req(1, width=96)]))
    assert (none, captured) == (0, 0)


def test_prompts_of_other_chunk_counts_share_a_gpu_call_each_reading_its_own(tiny_sdxl_path):
    """The shorter prompt padded and masked (`prompt_masks`): its image is its own call's
    within the rounding a batch of another size gives on the GPU."""
    from deployments.engines.sdxl import SDXLEngine

    chunked = SDXLEngine(tiny_sdxl_path, "float16", "cuda", prompts={"chunks": 3})
    batch = [_req(11), _req(12, prompt=" ".join(["the"] * 200))]
    assert [chunked.long_prompts.count(r.prompt, "") for r in batch] == [1, 3]
    together = chunked.generate(batch)
    for shared, request in zip(together, batch, strict=True):
        own = np.asarray(chunked.generate([request])[0][0]).astype(int)
        diff = np.abs(np.asarray(shared[0]).astype(int) - own)
        assert diff.max() <= 2 and (diff > 0).mean() < 0.05
