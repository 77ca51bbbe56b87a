"""The FLUX engine on CUDA in bfloat16 (skipped without a GPU)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from serve.types import GenerationRequest, SourceImage


@pytest.fixture(scope="module")
def engine(tiny_flux_path):
    from deployments.engines.flux import FluxEngine

    return FluxEngine(tiny_flux_path, "bfloat16", "cuda")


def _req(seed, **overrides):
    base = {"model": "a/flux", "prompt": "a red cube", "width": 128, "height": 96,
            "num_inference_steps": 4, "guidance_scale": 3.5, "seed": seed,
            "scheduler": "FlowMatchEuler"}
    return GenerationRequest(**{**base, **overrides})


def test_flux_runs_in_bfloat16_on_the_gpu(engine):
    facts = engine.describe()
    assert (facts["device"], facts["dtype"]) == ("cuda", "bfloat16")
    assert next(engine.pipe.transformer.parameters()).dtype == torch.bfloat16
    engine.check()


def test_flux_seeds_repeat_and_survive_batching_on_the_gpu(engine):
    a = np.asarray(engine.generate([_req(7)])[0][0]).astype(int)
    b = np.asarray(engine.generate([_req(7)])[0][0]).astype(int)
    c = np.asarray(engine.generate([_req(6), _req(7), _req(8, num_outputs=2)])[1][0]).astype(int)
    assert a.shape == (96, 128, 3) and np.array_equal(a, b)
    # bf16 kernels for batch 1 and batch 4 may round differently.
    assert np.abs(a - c).mean() < 2


def test_flux_img2img_on_the_gpu_keeps_the_size_and_strength_zero_the_pixels(engine):
    photo = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    kept = engine.generate([_req(1, source=SourceImage(photo.tobytes(), 0.0))])[0][0]
    moved = engine.generate([_req(1, source=SourceImage(photo.tobytes(), 0.6))])[0][0]
    assert np.array_equal(np.asarray(kept), photo) and moved.size == (128, 96)


def test_flux_inpainting_on_the_gpu_keeps_the_unmasked_pixels_exactly(engine):
    photo = np.random.default_rng(2).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    mask = np.zeros((96, 128), np.uint8)
    mask[20:70, 30:100] = 255
    (images,) = engine.generate([_req(3, source=SourceImage(photo.tobytes(), 0.9,
                                                             mask.tobytes()))])
    diff = np.abs(np.asarray(images[0]).astype(int) - photo.astype(int))
    assert diff[mask == 0].max() == 0 and diff[mask == 255].mean() > 20


def test_flux_adapters_fill_slots_on_the_gpu(tiny_flux_path, cache_dir):
    """Staged on pinned CPU memory, copied into bf16 slots on the device; scale 0 is the
    base model and an adapter changes the image."""
    from deployments.engines.flux import FluxEngine
    from deployments.tiny import TINY_FLUX_DEMO, ensure_demo_loras
    from serve.adapters import AdapterCatalog, AdapterSet

    catalog = AdapterCatalog.scan([(ensure_demo_loras(TINY_FLUX_DEMO, cache_dir), "flux",
                                    1.0)]).entries
    engine = FluxEngine(tiny_flux_path, "bfloat16", "cuda", adapters=catalog,
                        max_adapters=2, max_lora_rank=8)
    staged = engine.adapters.read("ink")
    a, _, _ = next(iter(staged.layers.values()))
    assert a.is_pinned() and a.dtype == torch.bfloat16

    def image(adapters):
        return np.asarray(engine.generate([_req(7, adapters=adapters)])[0][0]).astype(int)

    base = image(AdapterSet())
    assert np.array_equal(image(AdapterSet.of([("ink", 0.0)])), base)
    assert np.abs(image(AdapterSet.of([("neon", 1.0)])) - base).mean() > 2


def test_a_flux_built_on_the_gpu_is_saved_in_bfloat16_and_rebuilt_identically(tmp_path):
    """How the FLUX.1-dev benchmark model is made: each module built on the GPU and moved
    off in bfloat16; the same configs give the same weights, and the folder serves."""
    from safetensors.torch import load_file

    from deployments.engines.flux import FluxEngine
    from deployments.tiny_flux import TINY_FLUX_CONFIGS, build_random_flux

    for name in ("a", "b"):
        build_random_flux(tmp_path / name, TINY_FLUX_CONFIGS, "bfloat16", "cuda")
    file = "transformer/diffusion_pytorch_model.safetensors"
    first, again = load_file(tmp_path / "a" / file), load_file(tmp_path / "b" / file)
    assert {t.dtype for t in first.values()} == {torch.bfloat16}
    assert all(torch.equal(first[k], again[k]) for k in first)
    engine = FluxEngine(tmp_path / "a", "bfloat16", "cuda")
    image = np.asarray(engine.generate([_req(3)])[0][0])
    assert image.shape == (96, 128, 3) and image.std() > 0


def test_a_kontext_edit_runs_compiled_in_bfloat16_and_keeps_its_seed_batched(cache_dir):
    """FLUX.1 Kontext's edits on CUDA, compiled with fused projections: the reference's
    latents are encoded in bfloat16 beside the image's, and an edit's pixels hardly move
    when it shares a call."""
    from deployments.engines.flux import FluxKontextEngine
    from deployments.tiny import TINY_FLUX_KONTEXT, ensure_embedded
    from serve.config import SpeedConfig

    engine = FluxKontextEngine(ensure_embedded(TINY_FLUX_KONTEXT, cache_dir), "bfloat16",
                               "cuda", speed=SpeedConfig(fuse_qkv=True, compile=True),
                               compile_cache=cache_dir / "compile-gpu-kontext")
    reference = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    edit = SourceImage(reference.tobytes(), 1.0, edit=True)
    plain = np.asarray(engine.generate([_req(3)])[0][0]).astype(int)
    alone = np.asarray(engine.generate([_req(3, source=edit)])[0][0]).astype(int)
    batched = engine.generate([_req(3, source=edit), _req(4, source=edit)])
    assert alone.shape == (96, 128, 3) and not np.array_equal(alone, plain)
    assert np.abs(np.asarray(batched[0][0]).astype(int) - alone).mean() < 2


def test_a_kontext_edit_reads_a_further_reference_in_bfloat16_on_the_gpu(cache_dir):
    """A further reference is encoded in bfloat16 on the device beside the edited image:
    it changes the edit, and an edit with one keeps its seed's pixels when batched."""
    from deployments.engines.flux import FluxKontextEngine
    from deployments.tiny import TINY_FLUX_KONTEXT, ensure_embedded
    from serve.types import Reference

    engine = FluxKontextEngine(ensure_embedded(TINY_FLUX_KONTEXT, cache_dir), "bfloat16",
                               "cuda")
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    further = Reference(rng.integers(0, 256, (144, 48, 3), dtype=np.uint8).tobytes(), 48, 144)
    edit = SourceImage(reference.tobytes(), 1.0, edit=True)
    both = SourceImage(reference.tobytes(), 1.0, edit=True, references=(further,))
    alone = np.asarray(engine.generate([_req(3, source=edit)])[0][0]).astype(int)
    read = np.asarray(engine.generate([_req(3, source=both)])[0][0]).astype(int)
    batched = engine.generate([_req(3, source=both), _req(4, source=both)])
    assert read.shape == (96, 128, 3) and not np.array_equal(read, alone)
    assert np.abs(np.asarray(batched[0][0]).astype(int) - read).mean() < 2


def test_a_fill_runs_compiled_in_bfloat16_and_keeps_the_unmasked_pixels(cache_dir):
    """FLUX.1 Fill on CUDA, compiled with fused projections: the 384-channel input (noise,
    masked image, mask) in bfloat16; the unmasked pixels are the input's own, and a fill's
    pixels hardly move when it shares a call."""
    from deployments.engines.flux import FluxFillEngine
    from deployments.tiny import TINY_FLUX_FILL, ensure_embedded
    from serve.config import SpeedConfig

    engine = FluxFillEngine(ensure_embedded(TINY_FLUX_FILL, cache_dir), "bfloat16", "cuda",
                            speed=SpeedConfig(fuse_qkv=True, compile=True),
                            compile_cache=cache_dir / "compile-gpu-fill")
    photo = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    mask = np.zeros((96, 128), np.uint8)
    mask[32:64, 32:96] = 255
    fill = SourceImage(photo.tobytes(), 1.0, mask.tobytes())
    alone = np.asarray(engine.generate([_req(3, source=fill)])[0][0]).astype(int)
    batched = engine.generate([_req(3, source=fill), _req(4, source=fill)])
    white = mask == 255
    assert np.array_equal(alone[~white], photo[~white].astype(int))
    assert np.abs(alone - photo.astype(int))[white].mean() > 5
    assert np.abs(np.asarray(batched[0][0]).astype(int) - alone).mean() < 2


def test_a_canny_control_runs_compiled_in_bfloat16_and_keeps_its_seed_batched(cache_dir):
    """FLUX.1 Canny on CUDA, compiled with fused projections: the control image's latents
    (encoded in bfloat16) beside the noise; other edges give another image, and a
    request's pixels hardly move when it shares a call."""
    from deployments.engines.flux import FluxControlEngine
    from deployments.tiny import TINY_FLUX_CANNY, ensure_embedded
    from serve.config import SpeedConfig

    engine = FluxControlEngine(ensure_embedded(TINY_FLUX_CANNY, cache_dir), "bfloat16", "cuda",
                               speed=SpeedConfig(fuse_qkv=True, compile=True),
                               compile_cache=cache_dir / "compile-gpu-canny")
    edges = np.zeros((96, 128, 3), np.uint8)
    edges[20, 10:100] = edges[20:80, 10] = 255
    control = SourceImage(edges.tobytes(), 1.0, control=True)
    shifted = SourceImage(np.roll(edges, 30, axis=1).tobytes(), 1.0, control=True)
    alone = np.asarray(engine.generate([_req(3, source=control)])[0][0]).astype(int)
    batched = engine.generate([_req(3, source=control), _req(4, source=control)])
    other = np.asarray(engine.generate([_req(3, source=shifted)])[0][0]).astype(int)
    assert alone.shape == (96, 128, 3) and not np.array_equal(alone, other)
    assert np.abs(np.asarray(batched[0][0]).astype(int) - alone).mean() < 2


def test_a_redux_image_prompt_runs_compiled_in_bfloat16_and_keeps_its_seed_batched(
        tiny_flux_path, cache_dir):
    """FLUX.1 Redux on CUDA, compiled with fused projections: SigLIP and the embedder in
    bfloat16 on the GPU, their tokens after the prompt's; the picture moves the image, and
    a request's pixels hardly move when it shares a call."""
    from deployments.engines.flux import FluxEngine
    from deployments.tiny import TINY_FLUX_REDUX, ensure_embedded
    from serve.config import SpeedConfig
    from serve.types import ImagePrompt

    engine = FluxEngine(tiny_flux_path, "bfloat16", "cuda",
                        speed=SpeedConfig(fuse_qkv=True, compile=True),
                        compile_cache=cache_dir / "compile-gpu-redux",
                        redux=ensure_embedded(TINY_FLUX_REDUX, cache_dir))
    assert next(engine.redux.encoder.parameters()).dtype == torch.bfloat16
    picture = np.random.default_rng(2).integers(0, 256, (80, 60, 3), dtype=np.uint8)
    prompt = ImagePrompt(picture.tobytes(), 60, 80, 1.0)
    tokens = engine.redux.tokens(prompt.pictures[0])
    assert tokens.device.type == "cuda" and tokens.shape == (1, 64, 32)
    plain = np.asarray(engine.generate([_req(3)])[0][0]).astype(int)
    alone = np.asarray(engine.generate([_req(3, image_prompt=prompt)])[0][0]).astype(int)
    batched = engine.generate([_req(3, image_prompt=prompt), _req(4, image_prompt=prompt)])
    assert alone.shape == (96, 128, 3) and not np.array_equal(alone, plain)
    assert np.abs(np.asarray(batched[0][0]).astype(int) - alone).mean() < 2


def test_an_xlabs_ip_adapter_runs_compiled_in_bfloat16_and_keeps_its_rows_apart(
        tiny_flux_path, cache_dir):
    """XLabs' FLUX IP-Adapter on CUDA, compiled with fused projections: the CLIP encoder in
    bfloat16 on the GPU; the picture moves the image, a row without one in the same call
    is the plain image, and a request's pixels hardly move when it shares a call."""
    from deployments.engines.flux import FluxEngine
    from deployments.tiny import TINY_FLUX_IP_ADAPTER, ensure_embedded
    from serve.config import SpeedConfig
    from serve.steering import IP_ADAPTER_LAYOUTS
    from serve.types import ImagePrompt

    folder = ensure_embedded(TINY_FLUX_IP_ADAPTER, cache_dir)
    engine = FluxEngine(tiny_flux_path, "bfloat16", "cuda",
                        speed=SpeedConfig(fuse_qkv=True, compile=True),
                        compile_cache=cache_dir / "compile-gpu-flux-ip",
                        ip_adapter=(folder, *IP_ADAPTER_LAYOUTS["flux"]))
    assert next(engine.pipe.image_encoder.parameters()).dtype == torch.bfloat16
    picture = np.random.default_rng(2).integers(0, 256, (80, 60, 3), dtype=np.uint8)
    prompt = ImagePrompt(picture.tobytes(), 60, 80, 1.0)
    assert engine.image_prompts.embed(prompt).device.type == "cuda"
    plain = np.asarray(engine.generate([_req(3)])[0][0]).astype(int)
    alone = np.asarray(engine.generate([_req(3, image_prompt=prompt)])[0][0]).astype(int)
    batched = engine.generate([_req(3, image_prompt=prompt), _req(3)])
    assert alone.shape == (96, 128, 3) and np.abs(alone - plain).mean() > 2
    assert np.abs(np.asarray(batched[0][0]).astype(int) - alone).mean() < 2
    assert np.abs(np.asarray(batched[1][0]).astype(int) - plain).mean() < 2


def test_a_depth_control_runs_compiled_in_bfloat16_with_its_estimator_on_the_gpu(cache_dir):
    """FLUX.1 Depth on CUDA, compiled with fused projections: Depth Anything in bfloat16 on
    the GPU makes the control image; another layout gives another image, and a request's
    pixels hardly move when it shares a call."""
    from PIL import Image

    from deployments.engines.flux import FluxDepthEngine
    from deployments.tiny import TINY_DEPTH_ANYTHING, TINY_FLUX_DEPTH, ensure_embedded
    from serve.config import SpeedConfig

    engine = FluxDepthEngine(ensure_embedded(TINY_FLUX_DEPTH, cache_dir), "bfloat16", "cuda",
                             speed=SpeedConfig(fuse_qkv=True, compile=True),
                             compile_cache=cache_dir / "compile-gpu-depth",
                             depth_estimator=ensure_embedded(TINY_DEPTH_ANYTHING, cache_dir))
    assert next(engine.depth_maps.model.parameters()).dtype == torch.bfloat16
    scene = np.zeros((96, 128, 3), np.uint8)
    scene[20:60, 10:50] = 230
    picture = SourceImage(scene.tobytes(), 1.0, control=True)
    flipped = SourceImage(scene[:, ::-1].copy().tobytes(), 1.0, control=True)
    depth = np.asarray(engine.depth_maps.of(Image.fromarray(scene)))
    assert depth.shape == (96, 128, 3) and depth.max() == 255
    alone = np.asarray(engine.generate([_req(3, source=picture)])[0][0]).astype(int)
    batched = engine.generate([_req(3, source=picture), _req(4, source=picture)])
    other = np.asarray(engine.generate([_req(3, source=flipped)])[0][0]).astype(int)
    assert alone.shape == (96, 128, 3) and not np.array_equal(alone, other)
    assert np.abs(np.asarray(batched[0][0]).astype(int) - alone).mean() < 2
