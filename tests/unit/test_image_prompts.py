"""Image prompts (IP-Adapter), on the tiny SDXL's engine with the embedded tiny IP-Adapter
(CPU): the same pixels as diffusers' own pipelines given `ip_adapter_image` at the same
scale (text-to-image, img2img, with a ControlNet), requests with and without one and with
different scales in one call, withdrawal and the guidance cutoff, fused QKV, warm-up, and
the config's checks."""

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.tiny import TINY_SDXL_CONTROLNET, TINY_SDXL_IP_ADAPTER, ensure_embedded
from serve.config import ConfigError, parse_config
from serve.errors import InvalidField
from serve.types import ControlImage, GenerationRequest, ImagePrompt, SourceImage
from tests.ip_adapters import ENCODER, FIRST, PLUS, SUBFOLDER, two_adapters
from tests.unit.test_engine import _px, assert_same_pixels, withdrawing

BASE = GenerationRequest(model="a/b", prompt="a red cube", width=64, height=64,
                         num_inference_steps=6, guidance_scale=7.5, seed=5,
                         scheduler="K_EULER")
FILES = (SUBFOLDER, FIRST, ENCODER)


def _picture(seed: int, size=(48, 40)) -> Image.Image:
    noise = np.random.RandomState(seed).rand(size[1], size[0], 3)
    return Image.fromarray((noise * 255).astype("uint8"))


STRIPES, DOTS = _picture(1), _picture(2, (30, 50))


def _prompted(picture: Image.Image, scale: float = 0.6, **overrides) -> GenerationRequest:
    prompt = ImagePrompt(picture.tobytes(), *picture.size, scale)
    return replace(BASE, image_prompt=prompt, **overrides)


@pytest.fixture(scope="module")
def adapter_path(cache_dir):
    return ensure_embedded(TINY_SDXL_IP_ADAPTER, cache_dir)


@pytest.fixture(scope="module")
def engine(tiny_sdxl_path, adapter_path, cache_dir):
    from deployments.engines.sdxl import SDXLEngine

    net = ensure_embedded(TINY_SDXL_CONTROLNET, cache_dir)
    return SDXLEngine(tiny_sdxl_path, "float32", "cpu", controlnets={"canny": (net, None)},
                      ip_adapter=(adapter_path, *FILES))


def _reference(base, adapter_path, cls_name: str = "StableDiffusionXLPipeline",
               weight_name: str = FILES[1], **parts):
    """diffusers' own pipeline over freshly loaded tiny SDXL modules with the adapter."""
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(base, **parts)
    pipe.load_ip_adapter(str(adapter_path), subfolder=FILES[0], weight_name=weight_name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _seeds(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_the_images_are_diffusers_own_with_ip_adapter_image(engine, tiny_sdxl_path,
                                                            adapter_path):
    """In one call: two images with an image prompt at 0.6, one at 0.3 and one without;
    each is what diffusers draws for it alone, its adapter's scale set to the request's."""
    batch = [_prompted(STRIPES, num_outputs=2, negative_prompt="blurry"),
             _prompted(DOTS, 0.3, seed=9), replace(BASE, seed=11)]
    assert len({engine.batch_key(r) for r in batch}) == 1
    ours = engine.generate(batch)
    pipe = _reference(tiny_sdxl_path, adapter_path)
    args = {"prompt": "a red cube", "width": 64, "height": 64, "num_inference_steps": 6,
            "guidance_scale": 7.5}
    pipe.set_ip_adapter_scale(0.6)
    first = pipe(**args, negative_prompt="blurry", ip_adapter_image=STRIPES,
                 num_images_per_prompt=2, generator=_seeds(5, 6)).images
    pipe.set_ip_adapter_scale(0.3)
    second = pipe(**args, ip_adapter_image=DOTS, generator=_seeds(9)).images
    pipe.set_ip_adapter_scale(0.0)  # the adapter's attention skipped: the plain model
    plain = pipe(**args, ip_adapter_image=DOTS, generator=_seeds(11)).images
    for a, b in zip([*ours[0], *ours[1], *ours[2]], [*first, *second, *plain], strict=True):
        assert_same_pixels(a, b)


@pytest.fixture(scope="module")
def plus_adapter(cache_dir, tiny_sdxl_path, tmp_path_factory):
    """A folder with the tiny adapter's encoder and files: its own adapter, and a random
    "plus" one (ip-adapter-plus_sdxl_vit-h's kind: a resampler reads the encoder's
    penultimate hidden states, 16 image tokens) in the original layout."""
    return two_adapters(tmp_path_factory.mktemp("plus"), cache_dir, tiny_sdxl_path)


def test_a_plus_adapter_reads_hidden_states_as_diffusers_does(tiny_sdxl_path, plus_adapter):
    from deployments.engines.sdxl import SDXLEngine

    files = (FILES[0], PLUS, FILES[2])
    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu", ip_adapter=(plus_adapter, *files))
    assert engine.image_prompts.hidden_states
    ours = engine.generate([_prompted(STRIPES, 0.7), replace(BASE, seed=11)])
    pipe = _reference(tiny_sdxl_path, plus_adapter, weight_name=files[1])
    args = {"prompt": "a red cube", "width": 64, "height": 64, "num_inference_steps": 6,
            "guidance_scale": 7.5}
    pipe.set_ip_adapter_scale(0.7)
    theirs = pipe(**args, ip_adapter_image=STRIPES, generator=_seeds(5)).images[0]
    assert_same_pixels(ours[0][0], theirs)
    plain = engine.generate([replace(BASE, seed=11)])[0][0]
    assert_same_pixels(ours[1][0], plain)
    assert np.abs(_px(ours[0][0]) - _px(engine.generate([BASE])[0][0])).mean() > 1


def test_two_adapters_of_one_folder_are_diffusers_own_with_two_image_prompts(
        tiny_sdxl_path, plus_adapter):
    """The tiny adapter first and a plus one as "face" (different image encoder outputs:
    embeddings and hidden states), in one call: both prompts, the face's alone, the
    first's alone and none; each is what diffusers draws with both adapters loaded, their
    scales set to the request's (0 where it sends that adapter nothing)."""
    import diffusers

    from deployments.engines.sdxl import SDXLEngine

    weights = (("", FILES[1]), ("face", PLUS))
    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu",
                        ip_adapter=(plus_adapter, FILES[0], weights, FILES[2]))
    assert engine.image_prompts.hidden == [False, True]
    face = (("face", ImagePrompt(DOTS.tobytes(), *DOTS.size, 0.5)),)
    batch = [_prompted(STRIPES, extra_image_prompts=face),
             replace(BASE, seed=7, extra_image_prompts=(
                 ("face", ImagePrompt(DOTS.tobytes(), *DOTS.size, 0.8)),)),
             _prompted(STRIPES, 0.3, seed=9), replace(BASE, seed=11)]
    assert len({engine.batch_key(r) for r in batch}) == 1
    ours = engine.generate(batch)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.load_ip_adapter([str(plus_adapter)] * 2, subfolder=[FILES[0]] * 2,
                         weight_name=[FILES[1], PLUS])
    pipe.set_progress_bar_config(disable=True)
    args = {"prompt": "a red cube", "width": 64, "height": 64, "num_inference_steps": 6,
            "guidance_scale": 7.5, "ip_adapter_image": [STRIPES, DOTS]}
    for (image,), scales, seed in zip(ours, ([0.6, 0.5], [0.0, 0.8], [0.3, 0.0], [0.0, 0.0]),
                                      (5, 7, 9, 11), strict=True):
        pipe.set_ip_adapter_scale(scales)
        assert_same_pixels(image, pipe(**args, generator=_seeds(seed)).images[0])
    alone = engine.generate([_prompted(STRIPES, seed=5)])[0][0]  # the face moves it
    assert np.abs(_px(ours[0][0]) - _px(alone)).mean() > 1


def test_the_image_prompt_moves_the_image_and_scale_zero_does_not(engine):
    plain = engine.generate([BASE])[0][0]
    assert np.array_equal(_px(engine.generate([_prompted(STRIPES, 0.0)])[0][0]), _px(plain))
    stripes, dots = (engine.generate([_prompted(p, 1.0)])[0][0] for p in (STRIPES, DOTS))
    strong = engine.generate([_prompted(STRIPES, 2.0)])[0][0]
    gap = np.abs(_px(stripes) - _px(plain)).mean()
    assert gap > 2 and np.abs(_px(stripes) - _px(dots)).mean() > 0.3
    assert np.abs(_px(strong) - _px(plain)).mean() > gap


def test_img2img_and_a_controlnet_with_an_image_prompt_are_diffusers_own(
        engine, tiny_sdxl_path, adapter_path, cache_dir):
    from diffusers import ControlNetModel

    source = _picture(3, (64, 64))
    edges = _picture(4, (64, 64))
    img2img = _prompted(DOTS, 0.8, source=SourceImage(source.tobytes(), 0.7))
    controlled = _prompted(DOTS, 0.8, controls=(ControlImage("canny", edges.tobytes(), 0.5),))
    args = {"prompt": "a red cube", "num_inference_steps": 6, "guidance_scale": 7.5,
            "ip_adapter_image": DOTS, "generator": _seeds(5)}
    pipe = _reference(tiny_sdxl_path, adapter_path, "StableDiffusionXLImg2ImgPipeline")
    pipe.set_ip_adapter_scale(0.8)
    assert_same_pixels(engine.generate([img2img])[0][0],
                       pipe(**args, image=source, strength=0.7).images[0])
    net = ControlNetModel.from_pretrained(ensure_embedded(TINY_SDXL_CONTROLNET, cache_dir))
    pipe = _reference(tiny_sdxl_path, adapter_path, "StableDiffusionXLControlNetPipeline",
                      controlnet=net)
    pipe.set_ip_adapter_scale(0.8)
    args["generator"] = _seeds(5)
    assert_same_pixels(engine.generate([controlled])[0][0],
                       pipe(**args, image=edges, width=64, height=64,
                            controlnet_conditioning_scale=0.5).images[0])


def test_inpainting_with_an_image_prompt_keeps_the_unmasked_pixels(engine):
    picture = np.asarray(_picture(6, (64, 64)))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    source = SourceImage(picture.tobytes(), 0.8, mask.tobytes())
    prompted = engine.generate([_prompted(STRIPES, 1.0, source=source)])[0][0]
    plain = engine.generate([replace(BASE, source=source)])[0][0]
    assert np.array_equal(_px(prompted)[mask == 0], picture[mask == 0].astype(int))
    assert np.abs(_px(prompted) - _px(plain))[mask == 255].mean() > 1


def test_the_refiner_finishes_an_image_prompted_image_as_diffusers_two_pipelines_do(
        tiny_sdxl_path, adapter_path, cache_dir):
    """The image prompt steers the base model's steps; the refiner (which has no adapter)
    takes over its latents."""
    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_SDXL_REFINER

    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu", ip_adapter=(adapter_path, *FILES),
                        refiner=ensure_embedded(TINY_SDXL_REFINER, cache_dir))
    request = _prompted(DOTS, 0.9, refine="expert_ensemble_refiner", high_noise_frac=0.5)
    ours = engine.generate([request])[0][0]
    base = _reference(tiny_sdxl_path, adapter_path)
    base.set_ip_adapter_scale(0.9)
    generators = _seeds(5)
    latents = base(prompt="a red cube", ip_adapter_image=DOTS, width=64, height=64,
                   num_inference_steps=6, guidance_scale=7.5, denoising_end=0.5,
                   output_type="latent", generator=generators).images
    theirs = engine.refiner(prompt="a red cube", image=latents, num_inference_steps=6,
                            denoising_start=0.5, guidance_scale=7.5,
                            generator=generators).images[0]
    assert_same_pixels(ours, theirs)


def _run(engine, batch, after: int | None):
    """`withdrawing`, with the rows of the image tokens at each UNet call."""
    return withdrawing(engine, batch, after, engine.pipe.unet, lambda args, kwargs: (
        kwargs["added_cond_kwargs"]["image_embeds"][0].shape[0]))


@pytest.mark.parametrize("cutoff", [None, 0.5])
def test_withdrawal_and_the_guidance_cutoff_keep_each_rows_image_prompt(engine, cutoff):
    batch = [_prompted(STRIPES), _prompted(DOTS, seed=9, num_outputs=2), replace(BASE, seed=3),
             _prompted(DOTS, 1.2, seed=4)]
    engine.cfg_cutoff = cutoff
    try:
        whole, whole_rows = _run(engine, batch, after=None)
        out, rows = _run(engine, batch, after=2)
    finally:
        engine.cfg_cutoff = None
    assert [len(images) for images in out] == [1, 0, 1, 1]
    for i in (0, 2, 3):
        assert_same_pixels(out[i][0], whole[i][0])
    # 5 images, two rows each; withdrawn after step 2: 3 images left; with the cutoff,
    # one row per image after step index 3.
    assert whole_rows == ([10] * 6 if cutoff is None else [10] * 4 + [5] * 2)
    assert rows == ([10, 10, 6, 6, 6, 6] if cutoff is None else [10, 10, 6, 6, 3, 3])


def test_fused_qkv_keeps_the_adapters_attention(tiny_sdxl_path, adapter_path, engine):
    from deployments.engines.sdxl import SDXLEngine
    from serve.config import SpeedConfig

    fused = SDXLEngine(tiny_sdxl_path, "float32", "cpu", ip_adapter=(adapter_path, *FILES),
                       speed=SpeedConfig(fuse_qkv=True))
    processors = {type(p).__name__ for p in fused.pipe.unet.attn_processors.values()}
    assert processors == {"FusedAttnProcessor2_0", "IPAdapterAttnProcessor2_0"}
    request = _prompted(STRIPES, 1.0)
    assert_same_pixels(fused.generate([request])[0][0], engine.generate([request])[0][0])


def test_compiled_blocks_run_the_per_row_scales(tiny_sdxl_path, adapter_path, engine,
                                                compile_cache):
    """Compiled, the adapter's attention and its per-row scales run inside the compiled
    transformer blocks: the pixels of eager calls, for calls with and without image
    prompts and of two batch sizes."""
    from deployments.engines.sdxl import SDXLEngine
    from serve.config import SpeedConfig

    fast = SDXLEngine(tiny_sdxl_path, "float32", "cpu", ip_adapter=(adapter_path, *FILES),
                      speed=SpeedConfig(fuse_qkv=True, compile=True),
                      compile_cache=compile_cache)
    assert fast.describe()["speed"]["compiled_blocks"] > 0
    assert_compiled_like_eager(fast, engine, _prompted, BASE)


def assert_compiled_like_eager(fast, engine, prompted, base) -> None:
    """Calls with and without image prompts, at two batch sizes (`prompted(picture,
    scale, **overrides)` makes a request with one): the `fast` engine's pixels within two
    levels of the eager `engine`'s, on under 2 % of them."""
    for batch in ([prompted(STRIPES, 1.0)], [base],
                  [prompted(DOTS, 0.5), replace(base, seed=8), prompted(STRIPES, 1.0, seed=9)]):
        for a, b in zip(fast.generate(batch), engine.generate(batch), strict=True):
            diff = np.abs(_px(a[0]) - _px(b[0]))
            assert diff.max() <= 2 and (diff > 0).mean() < 0.02, (diff.max(), diff.mean())


def warm_up_encodings(engine, request) -> int:
    """How many pictures the image encoder encodes while `engine` warms up for `request`."""
    encoded = []
    hook = engine.pipe.image_encoder.register_forward_hook(lambda *a: encoded.append(1))
    try:
        engine.warm_up(request)
    finally:
        hook.remove()
    return len(encoded)


def test_warm_up_encodes_an_image_prompt_and_the_ready_facts_name_the_encoder(engine):
    assert warm_up_encodings(engine, BASE) == 1
    weights = engine.describe()["weights"]
    assert weights["ip-adapter image_encoder"] == weights["unet"] == "float32"


def test_a_repeated_picture_skips_the_image_encoder(tiny_sdxl_path, adapter_path):
    """The pictures encoded most recently are kept (by their pixels and size): the same
    mood board again gives the same embedding without encoding it, and the least recently
    used leaves first."""
    from diffusers import StableDiffusionXLPipeline

    from deployments.engines.image_prompts import ImagePrompts

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    prompts = ImagePrompts(pipe, adapter_path, *FILES, entries=2)
    encoded = []
    pipe.image_encoder.register_forward_hook(lambda *a: encoded.append(1))

    def embed(picture, scale=0.6):
        return prompts.embed(ImagePrompt(picture.tobytes(), *picture.size, scale))

    first = embed(STRIPES)
    assert embed(STRIPES, scale=1.2) is first and len(encoded) == 1  # the scale is not in it
    dots = embed(DOTS)
    assert not torch.equal(dots, first) and len(encoded) == 2
    embed(STRIPES)  # used again: DOTS is now the least recent
    embed(STRIPES.transpose(Image.Transpose.FLIP_LEFT_RIGHT))  # a third picture: DOTS leaves
    assert len(encoded) == 3
    assert torch.equal(embed(DOTS), dots) and len(encoded) == 4  # encoded again
    # DOTS's return pushed STRIPES out in turn: encoded again, to the same embedding.
    again = embed(STRIPES)
    assert again is not first and torch.equal(again, first) and len(encoded) == 5


def test_the_config_checks_the_adapters_files_and_family(tmp_path, adapter_path):
    def config(**adapter):
        return parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl",
                                         "ip_adapter": adapter}]})

    config(path=str(adapter_path)).check_paths()
    with pytest.raises(ConfigError, match=r"models\.0\.ip_adapter\.weight_name"):
        config(path=str(adapter_path), weight_name="ip-adapter-plus_sdxl_vit-h.safetensors"
               ).check_paths()
    with pytest.raises(ConfigError, match=r"models\.0\.ip_adapter\.image_encoder: .*models/"):
        config(path=str(adapter_path), image_encoder="models/image_encoder").check_paths()
    with pytest.raises(ConfigError, match="is a sdxl IP-Adapter, and this is a flux model"):
        parse_config({"models": [{"id": "a/b", "family": "flux", "embedded": "tiny-flux",
                                  "ip_adapter": {"embedded": "tiny-sdxl-ip-adapter"}}]})
    with pytest.raises(ConfigError, match="scale"):
        config(embedded="tiny-sdxl-ip-adapter", scale=3)
    with pytest.raises(ConfigError, match="weight_name: the embedded IP-Adapter"):
        config(embedded="tiny-sdxl-ip-adapter", weight_name="ip-adapter-plus_sdxl.safetensors")
    plain = parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl"}]}).models[0]
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(plain, "x", image_prompt=_prompted(DOTS).image_prompt)
    assert refused.value.field == "ip_adapter_image"


def test_a_models_version_pins_its_ip_adapters_weights_and_scale(tmp_path, adapter_path):
    from serve.config import ModelConfig
    from serve.versions import version_id

    def version(**adapter):
        return version_id(ModelConfig(id="a/b", embedded="tiny-sdxl",
                                      ip_adapter=adapter or None), tmp_path)

    copy = tmp_path / "copy"
    shutil.copytree(adapter_path, copy)
    weights = copy / FILES[0] / FILES[1]
    one = version(path=copy)
    assert one == version(path=copy)
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert len({version(), one, version(path=copy), version(path=copy, scale=0.9)}) == 4


def test_further_adapters_are_checked_pinned_and_named_by_requests(plus_adapter, tmp_path):
    """`ip_adapter.extra`: files checked at start, SDXL only, not with the embedded
    adapter; each file in the version; an image prompt for a name the model does not hold
    is refused on `extra_ip_adapters`, and one for a held name is read at its scale."""
    import asyncio
    import base64
    import io

    from serve.controls import ImagePromptParams, load_extra_image_prompts
    from serve.images import ImageFetcher
    from serve.versions import version_id

    face = {"face": {"weight_name": PLUS, "scale": 0.4}}

    def model(**adapter):
        return parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl", "ip_adapter": {
            "path": str(plus_adapter)} | adapter}]})

    two = model(extra=face)
    two.check_paths()
    with pytest.raises(ConfigError, match=r"models\.0\.ip_adapter\.extra\.face\.weight_name"):
        model(extra={"face": {"weight_name": "nothing.safetensors"}}).check_paths()
    with pytest.raises(ConfigError, match="extra: the embedded IP-Adapter"):
        parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl", "ip_adapter": {
            "embedded": "tiny-sdxl-ip-adapter", "extra": face}}]})
    with pytest.raises(ConfigError, match="ip_adapter.extra: a FLUX model reads one"):
        parse_config({"models": [{"id": "a/b", "family": "flux", "embedded": "tiny-flux",
                                  "ip_adapter": {"path": str(plus_adapter), "extra": face}}]})
    with pytest.raises(ConfigError, match="ip_adapter.extra"):
        model(extra={"Face!": {"weight_name": PLUS}})
    one_version = version_id(model().models[0], tmp_path)
    assert version_id(two.models[0], tmp_path) not in (one_version, version_id(
        model(extra={"face": {"weight_name": PLUS, "scale": 0.5}}).models[0], tmp_path))

    served, fetcher, data = two.models[0], ImageFetcher([], None, None), io.BytesIO()
    DOTS.save(data, "PNG")
    text = base64.b64encode(data.getvalue()).decode()
    ((name, prompt),) = asyncio.run(load_extra_image_prompts(
        {"face": ImagePromptParams(text)}, served, fetcher))
    assert (name, prompt.width, prompt.height, prompt.scale) == ("face", 30, 50, 0.4)
    assert prompt.rgb == DOTS.tobytes()
    with pytest.raises(InvalidField, match="'style' is not one of .* \\(face\\)") as refused:
        asyncio.run(load_extra_image_prompts({"style": ImagePromptParams(text)}, served,
                                             fetcher))
    assert refused.value.field == "extra_ip_adapters"
    with pytest.raises(InvalidField) as refused:
        GenerationRequest.for_model(model().models[0], "x", extra_image_prompts=(
            ("face", prompt),))
    assert refused.value.field == "extra_ip_adapters"


def test_an_edits_form_sends_further_image_prompts_as_json_text():
    from pydantic import ValidationError

    from serve.controls import ImagePromptParams
    from serve.routes.openai_params import ImageEditParams

    form = ImageEditParams.model_validate({"prompt": "x", "controlnets": "[]",
                                           "extra_ip_adapters": '{"face": {"image": "abc"}}'})
    assert form.extra_prompt_params() == {"face": ImagePromptParams("abc")}
    with pytest.raises(ValidationError) as refused:
        ImageEditParams.model_validate({"prompt": "x", "extra_ip_adapters": "{face"})
    assert refused.value.errors()[0]["loc"] == ("extra_ip_adapters",)


def test_an_image_prompt_is_read_as_an_input_image_and_scaled_down(tmp_path):
    import asyncio
    import base64
    import io

    from serve.config import default_config
    from serve.controls import ImagePromptParams, load_image_prompt
    from serve.images import ImageFetcher

    model = default_config().models[0]
    fetcher = ImageFetcher([], None, None)
    big = _picture(5, (1600, 900))
    data = io.BytesIO()
    big.save(data, "PNG")
    text = base64.b64encode(data.getvalue()).decode()
    prompt = asyncio.run(load_image_prompt(ImagePromptParams(text), model, fetcher))
    assert (prompt.width, prompt.height, prompt.scale) == (910, 512, model.ip_adapter.scale)
    assert len(prompt.rgb) == 910 * 512 * 3
    small = io.BytesIO()
    DOTS.save(small, "PNG")
    text = base64.b64encode(small.getvalue()).decode()
    prompt = asyncio.run(load_image_prompt(ImagePromptParams(text, 1.5), model, fetcher))
    assert prompt.rgb == DOTS.tobytes() and prompt.scale == 1.5
    assert asyncio.run(load_image_prompt(ImagePromptParams(None, 1.0), model, fetcher)) is None
    flux = default_config().models[1]
    # A FLUX model reads its image prompt from redux_image, an SDXL one not from there.
    for bad, field in ((flux, "ip_adapter_image"), (model, "ip_adapter_image"),
                       (model, "redux_image")):
        with pytest.raises(InvalidField) as refused:
            image = "not an image" if field == "ip_adapter_image" and bad is model else text
            asyncio.run(load_image_prompt(ImagePromptParams(image, None, field), bad, fetcher))
        assert refused.value.field == field


def test_an_image_prompt_steers_the_hires_pass_row_by_row(engine):
    """A hires call of requests with and without an image prompt: each keeps the pixels
    it has alone, the prompted one another image than without its picture."""
    larger = {"hires_scale": 1.5, "hires_strength": 0.6}
    prompted = _prompted(STRIPES, **larger)
    plain = replace(BASE, seed=9, prompt="a blue cone", **larger)
    together = engine.generate([prompted, plain])
    for alone, shared in zip((engine.generate([prompted]), engine.generate([plain])), together):
        assert shared[0].size == (96, 96)
        assert np.abs(_px(alone[0][0]) - _px(shared[0])).max() <= 1
    unprompted = engine.generate([replace(prompted, image_prompt=None)])[0][0]
    assert np.abs(_px(together[0][0]) - _px(unprompted)).mean() > 1
