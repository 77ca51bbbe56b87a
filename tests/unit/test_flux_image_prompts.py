"""Image prompts on FLUX (XLabs' IP-Adapter), on the tiny FLUX's engine with the embedded
tiny adapter in XLabs' layout (CPU): the pixels of diffusers' own FluxPipeline with the
adapter loaded by its FluxIPAdapterMixin (text-to-image, img2img, with a ControlNet), a row
without an image prompt exactly the model's without the adapter, requests with and
without one and with different scales in one call, withdrawal, fused QKV and compiled
blocks, warm-up, and the config's checks and defaults."""

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.engines.controlnets import NetFiles
from deployments.tiny import TINY_FLUX_IP_ADAPTER, ensure_embedded
from deployments.tiny_flux import T5_TOKENS
from serve.config import ConfigError, parse_config
from serve.types import ControlImage, GenerationRequest, ImagePrompt, SourceImage
from tests.unit.test_engine import _px, assert_same_pixels, withdrawing
from tests.unit.test_flux_controlnet import controlnet_path  # noqa: F401
from tests.unit.test_image_prompts import (
    DOTS,
    STRIPES,
    _picture,
    _seeds,
    assert_compiled_like_eager,
    warm_up_encodings,
)

BASE = GenerationRequest(model="a/flux", prompt="a red shoe on a table", width=64, height=64,
                         num_inference_steps=5, guidance_scale=3.5, seed=5,
                         scheduler="FlowMatchEuler")
FILES = ("", "ip_adapter.safetensors", "image_encoder")


def _prompted(picture: Image.Image, scale: float = 1.0, **overrides) -> GenerationRequest:
    return replace(BASE, image_prompt=ImagePrompt(picture.tobytes(), *picture.size, scale),
                   **overrides)


@pytest.fixture(scope="module")
def adapter_path(cache_dir):
    return ensure_embedded(TINY_FLUX_IP_ADAPTER, cache_dir)


@pytest.fixture(scope="module")
def engine(tiny_flux_path, adapter_path, controlnet_path):  # noqa: F811
    from deployments.engines.flux import FluxEngine

    return FluxEngine(tiny_flux_path, "float32", "cpu", ip_adapter=(adapter_path, *FILES),
                      controlnets={"canny": NetFiles(controlnet_path, None, 0)})


def _reference(pipe, adapter_path, scale: float):
    """diffusers' own pipeline over fresh tiny FLUX modules, the adapter loaded as its
    documentation loads XLabs' (the image encoder named by its own path)."""
    pipe.load_ip_adapter(str(adapter_path), weight_name=FILES[1],
                         image_encoder_pretrained_model_name_or_path=str(
                             adapter_path / FILES[2]),
                         image_encoder_dtype=torch.float32)
    pipe.set_ip_adapter_scale(scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


ARGS = {"prompt": BASE.prompt, "width": 64, "height": 64, "num_inference_steps": 5,
        "guidance_scale": 3.5, "max_sequence_length": T5_TOKENS}


def test_the_images_are_diffusers_own_with_ip_adapter_image(engine, tiny_flux_path,
                                                            adapter_path, flux):
    """In one call: two images with an image prompt at 1.0, one at 0.5 and one without;
    each is what diffusers draws for it alone with the adapter's scale set to the
    request's, and the one without is the plain model's, exactly."""
    from diffusers import FluxPipeline

    batch = [_prompted(STRIPES, num_outputs=2), _prompted(DOTS, 0.5, seed=9),
             replace(BASE, seed=11)]
    assert len({engine.batch_key(r) for r in batch}) == 1
    ours = engine.generate(batch)
    pipe = _reference(FluxPipeline.from_pretrained(tiny_flux_path), adapter_path, 1.0)
    first = pipe(**ARGS, ip_adapter_image=STRIPES, num_images_per_prompt=2,
                 generator=_seeds(5, 6)).images
    for a, b in zip(ours[0], first, strict=True):
        assert_same_pixels(a, b)
    pipe.set_ip_adapter_scale(0.5)
    second = pipe(**ARGS, ip_adapter_image=DOTS, generator=_seeds(9)).images[0]
    # The request's scale multiplies the image attention's values, diffusers' its output:
    # equal but for rounding, which five steps carry to a level or two on a few pixels.
    diff = np.abs(_px(ours[1][0]) - _px(second))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.2, (diff.max(), (diff > 0).mean())
    assert np.array_equal(_px(ours[2][0]), _px(flux.generate([replace(BASE, seed=11)])[0][0]))


def test_the_image_prompt_moves_the_image_and_scale_zero_does_not(engine, flux):
    plain = flux.generate([BASE])[0][0]
    assert np.array_equal(_px(engine.generate([BASE])[0][0]), _px(plain))
    assert np.array_equal(_px(engine.generate([_prompted(STRIPES, 0.0)])[0][0]), _px(plain))
    stripes, dots = (engine.generate([_prompted(p)])[0][0] for p in (STRIPES, DOTS))
    weak = engine.generate([_prompted(STRIPES, 0.3)])[0][0]
    gap = np.abs(_px(stripes) - _px(plain)).mean()
    assert gap > 2 and np.abs(_px(stripes) - _px(dots)).mean() > 0.3
    assert 0 < np.abs(_px(weak) - _px(plain)).mean() < gap


def test_img2img_and_a_controlnet_with_an_image_prompt_are_diffusers_own(
        engine, tiny_flux_path, adapter_path, controlnet_path):  # noqa: F811
    """The other pipelines get the image tokens from the transformer's hook as the plain
    one does: diffusers' img2img and ControlNet pipelines given ip_adapter_image."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxImg2ImgPipeline

    source, edges = _picture(3, (64, 64)), _picture(4, (64, 64))
    img2img = _prompted(DOTS, source=SourceImage(source.tobytes(), 0.7))
    pipe = _reference(FluxImg2ImgPipeline.from_pretrained(tiny_flux_path), adapter_path, 1.0)
    assert_same_pixels(engine.generate([img2img])[0][0], pipe(
        **ARGS, image=source, strength=0.7, ip_adapter_image=DOTS,
        generator=_seeds(5)).images[0])
    controlled = _prompted(DOTS, controls=(ControlImage("canny", edges.tobytes(), 0.7),))
    pipe = _reference(FluxControlNetPipeline.from_pretrained(
        tiny_flux_path, controlnet=FluxControlNetModel.from_pretrained(controlnet_path)),
        adapter_path, 1.0)
    assert_same_pixels(engine.generate([controlled])[0][0], pipe(
        **ARGS, control_image=edges, control_mode=0, controlnet_conditioning_scale=0.7,
        ip_adapter_image=DOTS, generator=_seeds(5)).images[0])


def test_inpainting_with_an_image_prompt_keeps_the_unmasked_pixels(engine):
    picture = np.asarray(_picture(6, (64, 64)))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    source = SourceImage(picture.tobytes(), 0.8, mask.tobytes())
    prompted = engine.generate([_prompted(STRIPES, source=source)])[0][0]
    plain = engine.generate([replace(BASE, source=source)])[0][0]
    assert np.array_equal(_px(prompted)[mask == 0], picture[mask == 0].astype(int))
    assert np.abs(_px(prompted) - _px(plain))[mask == 255].mean() > 1


def test_withdrawal_keeps_each_rows_image_prompt(engine):
    batch = [_prompted(STRIPES), _prompted(DOTS, seed=9, num_outputs=2), replace(BASE, seed=3),
             _prompted(DOTS, 1.5, seed=4)]

    def run(after):
        return withdrawing(engine, batch, after, engine.pipe.transformer, lambda args, kw: (
            kw["hidden_states"].shape[0], engine.image_prompts._row_scales[0][None].tolist()))

    whole, whole_rows = run(None)
    out, rows = run(2)
    assert [len(images) for images in out] == [1, 0, 1, 1]
    for i in (0, 2, 3):
        assert_same_pixels(out[i][0], whole[i][0])
    assert whole_rows == [(5, [1.0, 1.0, 1.0, 0.0, 1.5])] * 5
    assert rows == [(5, [1.0, 1.0, 1.0, 0.0, 1.5])] * 2 + [(3, [1.0, 0.0, 1.5])] * 3


def test_fused_qkv_and_compiled_blocks_keep_the_adapters_attention(
        tiny_flux_path, adapter_path, engine, compile_cache):
    """Fused QKV leaves XLabs' attention in place (it reads the fused projections), and
    compiled, the attention and its per-row scales run inside the compiled blocks: the
    pixels of eager calls, with and without image prompts and at two batch sizes."""
    from deployments.engines.flux import FluxEngine
    from serve.config import SpeedConfig

    fast = FluxEngine(tiny_flux_path, "float32", "cpu", ip_adapter=(adapter_path, *FILES),
                      speed=SpeedConfig(fuse_qkv=True, compile=True),
                      compile_cache=compile_cache, fuse_adapters=True)
    assert fast.describe()["speed"]["compiled_blocks"] > 0
    processors = {type(p).__name__ for p in fast.pipe.transformer.attn_processors.values()}
    assert "FluxIPAdapterAttnProcessor" in processors
    assert_compiled_like_eager(fast, engine, _prompted, BASE)


def test_warm_up_encodes_an_image_prompt_and_the_ready_facts_name_the_adapter(engine):
    assert warm_up_encodings(engine, BASE) == 1
    facts = engine.describe()
    assert facts["ip_adapter"] is True and facts["redux"] is False
    assert facts["weights"]["ip-adapter image_encoder"] == facts["weights"]["transformer"]


def test_the_config_takes_xlabs_layout_by_default_and_checks_the_family(tmp_path,
                                                                        adapter_path):
    def config(model=None, **adapter):
        model = model or {"family": "flux", "embedded": "tiny-flux"}
        return parse_config({"models": [{"id": "a/b", **model, "ip_adapter": adapter}]})

    # XLabs-AI/flux-ip-adapter's files at the folder's top, the encoder copied beside them.
    made = config(path=str(adapter_path))
    made.check_paths()
    assert made.models[0].ip_adapter.layout("flux") == FILES
    assert made.models[0].image_prompt_field == "ip_adapter_image"
    encoder = tmp_path / "clip-vit-large-patch14"
    shutil.copytree(adapter_path / FILES[2], encoder)
    config(path=str(adapter_path), image_encoder=str(encoder)).check_paths()  # absolute
    with pytest.raises(ConfigError, match=r"models\.0\.ip_adapter\.weight_name: .*v2"):
        config(path=str(adapter_path), weight_name="ip_adapter_v2.safetensors").check_paths()
    refusals = [({"embedded": "tiny-sdxl-ip-adapter"}, None, "is a sdxl IP-Adapter"),
                ({"embedded": "tiny-flux-ip-adapter"}, {"embedded": "tiny-sdxl"},
                 "is a flux IP-Adapter"),
                ({"embedded": "tiny-flux-ip-adapter"},
                 {"family": "flux", "embedded": "tiny-flux", "redux": {
                     "embedded": "tiny-flux-redux"}}, "Redux or an IP-Adapter, not both"),
                ({"embedded": "tiny-flux-ip-adapter"},
                 {"family": "flux", "embedded": "tiny-flux-kontext", "kontext": True},
                 "Kontext model takes no IP-Adapter"),
                ({"embedded": "tiny-flux-ip-adapter", "subfolder": "x"}, None,
                 "subfolder: the embedded IP-Adapter")]
    for adapter, model, says in refusals:
        with pytest.raises(ConfigError, match=says):
            config(model, **adapter)


def test_the_engine_loads_the_adapter_the_config_names(adapter_path, cache_dir, tmp_path):
    """create_engine reads the model's adapter from the config's layout: a copy of the
    files with the encoder elsewhere gives the embedded adapter's pixels."""
    from deployments.engines import create_engine
    from serve.config import ModelConfig

    copy = tmp_path / "xlabs"
    shutil.copytree(adapter_path, copy)
    (copy / FILES[2]).rename(tmp_path / "clip")
    def model(**adapter):
        return ModelConfig(id="a/b", family="flux", embedded="tiny-flux", ip_adapter=adapter)

    engine = create_engine(model(path=copy, image_encoder=str(tmp_path / "clip")), cache_dir,
                           None)
    embedded = create_engine(model(embedded="tiny-flux-ip-adapter"), cache_dir, None)
    request = _prompted(DOTS, 0.7)
    assert np.array_equal(_px(engine.generate([request])[0][0]),
                          _px(embedded.generate([request])[0][0]))
