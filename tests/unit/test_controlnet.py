"""Images steered by ControlNets, on the tiny SDXL's engine with the embedded tiny
ControlNet (CPU): the same pixels as diffusers' own ControlNet pipelines (text-to-image,
img2img, several ControlNets at once), the control image's effect, batches of different
control images, withdrawal, switching ControlNets, inpainting, and the Canny
preprocessing."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from deployments.tiny import TINY_SDXL_CONTROLNET, ensure_embedded
from serve.canvases import CONTROLNET_CANNY_THRESHOLDS, canny
from serve.types import ControlImage, GenerationRequest, SourceImage
from tests.unit.test_engine import _px, assert_same_pixels, withdrawing

BASE = GenerationRequest(model="a/b", prompt="a red cube", width=64, height=64,
                         num_inference_steps=6, guidance_scale=7.5, seed=5,
                         scheduler="K_EULER")


def _shapes(box: tuple[int, int, int, int]) -> Image.Image:
    """A white rectangle and a grey disc on black: a control map with clear shapes."""
    image = Image.new("RGB", (64, 64))
    draw = ImageDraw.Draw(image)
    draw.rectangle(box, fill=(255, 255, 255))
    draw.ellipse((36, 36, 60, 60), fill=(128, 128, 128))
    return image


SQUARE, WIDE = _shapes((8, 8, 30, 30)), _shapes((4, 20, 60, 32))


@pytest.fixture(scope="module")
def controlnet_path(cache_dir):
    return ensure_embedded(TINY_SDXL_CONTROLNET, cache_dir)


@pytest.fixture(scope="module")
def other_controlnet(controlnet_path, tmp_path_factory):
    """The tiny ControlNet with its output convolutions drawn again: another ControlNet of
    the same design, saved as diffusers saves one."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(controlnet_path)
    torch.manual_seed(1)
    for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.1)
    folder = tmp_path_factory.mktemp("other-controlnet")
    net.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def engine(tiny_sdxl_path, controlnet_path, other_controlnet):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float32", "cpu",
                      controlnets={"canny": (controlnet_path, None),
                                   "other": (other_controlnet, None)})


def _req(control: Image.Image, scale: float = 1.0, name: str = "canny", **overrides):
    return replace(BASE, controls=(ControlImage(name, control.tobytes(), scale),), **overrides)


def test_the_images_are_diffusers_own_controlnet_pipelines(engine, controlnet_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    request = _req(SQUARE, 0.7, num_outputs=2, negative_prompt="blurry")
    ours = engine.generate([request])[0]
    reference = StableDiffusionXLControlNetPipeline.from_pipe(
        engine.pipe, controlnet=ControlNetModel.from_pretrained(controlnet_path))
    reference.set_progress_bar_config(disable=True)
    theirs = reference(prompt="a red cube", negative_prompt="blurry", image=SQUARE,
                       width=64, height=64, num_inference_steps=6, guidance_scale=7.5,
                       controlnet_conditioning_scale=0.7, num_images_per_prompt=2,
                       generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images
    for a, b in zip(ours, theirs, strict=True):
        assert_same_pixels(a, b)


def test_scale_zero_draws_the_plain_image_and_the_control_image_moves_it(engine):
    plain = engine.generate([BASE])[0][0]
    assert np.array_equal(_px(engine.generate([_req(SQUARE, 0.0)])[0][0]), _px(plain))
    square, wide = (engine.generate([_req(c)])[0][0] for c in (SQUARE, WIDE))
    # Measured: 7.4 and 7.1 levels from the plain image, 1.2 between the two (random
    # weights: the ControlNet's own pass counts more than the control image here).
    assert np.abs(_px(square) - _px(plain)).mean() > 3
    assert np.abs(_px(square) - _px(wide)).mean() > 0.6


def test_steering_only_the_first_steps_moves_the_image_less(engine):
    plain, full = engine.generate([BASE])[0][0], engine.generate([_req(SQUARE)])[0][0]
    early = replace(BASE, controls=(ControlImage("canny", SQUARE.tobytes(), 1.0, 0.0, 0.34),))
    part = engine.generate([early])[0][0]
    gap = np.abs(_px(part) - _px(plain)).mean()
    # Measured: 6.7 levels from the plain image (the whole run's: 7.4), 1.6 from it.
    assert 0 < gap < np.abs(_px(full) - _px(plain)).mean()
    assert np.abs(_px(part) - _px(full)).mean() > 0.8


def test_each_image_follows_its_own_control_image_in_a_shared_call(engine):
    a, b = _req(SQUARE), _req(WIDE, seed=9, prompt="a blue cone")
    assert engine.batch_key(a) == engine.batch_key(b)
    together = engine.generate([a, b])
    assert_same_pixels(together[0][0], engine.generate([a])[0][0])
    assert_same_pixels(together[1][0], engine.generate([b])[0][0])


@pytest.mark.parametrize("rescales", [(0.0, 0.0), (0.7, 0.0)], ids=["scales", "rescales"])
def test_each_image_keeps_its_guidance_scale_and_rescale_in_a_shared_call(engine, rescales):
    """The rescale of a ControlNet text-to-image call is the engine's hook: each row
    its own request's too."""
    a = _req(SQUARE, guidance_rescale=rescales[0])
    b = _req(WIDE, seed=9, guidance_scale=12.0, guidance_rescale=rescales[1])
    assert engine.batch_key(a) == engine.batch_key(b)
    together = engine.generate([a, b])
    assert_same_pixels(together[0][0], engine.generate([a])[0][0])
    assert_same_pixels(together[1][0], engine.generate([b])[0][0])


def _withdrawing(engine, batch: list, after: int | None, net: str = "canny"):
    """`withdrawing`, with the batch rows of each forward of ControlNet `net` (called with
    keywords when combined)."""
    return withdrawing(engine, batch, after, engine.controlnets.nets[net],
                       lambda args, kwargs: (args[0] if args else kwargs["sample"]).shape[0])


@pytest.mark.parametrize("nets", [1, 2])
def test_a_withdrawn_request_leaves_and_the_others_keep_their_pixels(engine, nets):
    def req(**overrides):
        return _req(SQUARE, **overrides) if nets == 1 else _both(**overrides)

    batch = [req(), req(seed=9, num_outputs=2), req(seed=11)]
    untouched = engine.generate(batch)
    out, rows = _withdrawing(engine, batch, after=3)
    assert [len(images) for images in out] == [1, 0, 1]
    assert_same_pixels(out[0][0], untouched[0][0])
    assert_same_pixels(out[2][0], untouched[2][0])
    assert rows[0] == 8 and rows[-1] == 4  # two guidance rows per image: 4 images, then 2


def test_each_call_runs_the_controlnet_its_requests_name(engine):
    canny_image = engine.generate([_req(SQUARE)])[0][0]
    other = engine.generate([_req(SQUARE, name="other")])[0][0]
    assert np.abs(_px(other) - _px(canny_image)).mean() > 1
    assert np.array_equal(_px(engine.generate([_req(SQUARE)])[0][0]), _px(canny_image))
    assert _req(SQUARE).batch_key != _req(SQUARE, name="other").batch_key
    assert _req(SQUARE).batch_key != _req(SQUARE, 0.5).batch_key
    assert _req(SQUARE).batch_key != BASE.batch_key


def test_warm_up_runs_each_controlnet_at_each_batch_size(engine):
    """Calls of 1 and 2 images with each ControlNet (the rows each step: both guidance
    halves of each image), as the warm-up runs the plain calls."""
    rows = {name: [] for name in engine.controlnets.nets}
    hooks = [net.register_forward_pre_hook(
        lambda m, a, name=name: rows[name].append(a[0].shape[0]))
        for name, net in engine.controlnets.nets.items()]
    try:
        engine.warm_up(BASE, max_images=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert rows == {"canny": [2] * 6 + [4] * 6, "other": [2] * 6 + [4] * 6}
    facts = engine.describe()
    assert facts["controlnets"] == ["canny", "other"]
    assert facts["weights"]["controlnet canny"] == facts["weights"]["unet"] == "float32"


def test_canny_gives_white_edges_on_black_along_the_shapes():
    edges = np.asarray(canny(_shapes((8, 8, 30, 30)), *CONTROLNET_CANNY_THRESHOLDS))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    white = edges[..., 0] == 255
    assert white[8:31, 6:11].any() and white[6:11, 8:31].any()  # the square's sides
    assert not white[14:25, 14:25].any()  # nothing inside it
    assert not white[:, :4].any()  # nor on the blank border


def _both(scales=(1.0, 1.0), **overrides):
    return replace(BASE, controls=(ControlImage("canny", SQUARE.tobytes(), scales[0]),
                                   ControlImage("other", WIDE.tobytes(), scales[1])),
                   **overrides)


def test_two_controlnets_combine_as_diffusers_multicontrolnet_does(engine, controlnet_path,
                                                                   other_controlnet):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    ours = engine.generate([_both((0.8, 0.6))])[0][0]
    nets = [ControlNetModel.from_pretrained(p) for p in (controlnet_path, other_controlnet)]
    reference = StableDiffusionXLControlNetPipeline.from_pipe(engine.pipe, controlnet=nets)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(prompt="a red cube", image=[SQUARE, WIDE], width=64, height=64,
                       num_inference_steps=6, guidance_scale=7.5,
                       controlnet_conditioning_scale=[0.8, 0.6],
                       generator=[torch.Generator().manual_seed(5)]).images[0]
    assert_same_pixels(ours, theirs)
    # A ControlNet at scale 0 adds nothing: the pair is then the other one alone.
    assert_same_pixels(engine.generate([_both((1.0, 0.0))])[0][0],
                       engine.generate([_req(SQUARE)])[0][0])
    alone = engine.generate([_req(WIDE, name="other")])[0][0]
    assert np.abs(_px(engine.generate([_both()])[0][0]) - _px(alone)).mean() > 1


INPUT = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
MASK = np.zeros((64, 64), np.uint8)
MASK[16:48, 16:48] = 255


def test_img2img_with_a_controlnet_is_diffusers_own(engine, controlnet_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline

    source = SourceImage(Image.fromarray(INPUT).tobytes(), 0.7)
    ours = engine.generate([_req(SQUARE, 0.9, source=source)])[0][0]
    reference = StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(
        engine.pipe, controlnet=ControlNetModel.from_pretrained(controlnet_path))
    reference.set_progress_bar_config(disable=True)
    theirs = reference(prompt="a red cube", image=Image.fromarray(INPUT), control_image=SQUARE,
                       strength=0.7, width=64, height=64, num_inference_steps=6,
                       guidance_scale=7.5, controlnet_conditioning_scale=0.9,
                       generator=[torch.Generator().manual_seed(5)]).images[0]
    assert_same_pixels(ours, theirs)
    plain = engine.generate([replace(BASE, source=source)])[0][0]
    assert np.abs(_px(ours) - _px(plain)).mean() > 1


def test_inpainting_with_a_controlnet_keeps_the_unmasked_pixels(engine):
    source = SourceImage(Image.fromarray(INPUT).tobytes(), 0.8, Image.fromarray(MASK).tobytes())
    steered = engine.generate([_req(SQUARE, source=source)])[0][0]
    plain = engine.generate([replace(BASE, source=source)])[0][0]
    assert np.array_equal(_px(steered)[MASK == 0], INPUT[MASK == 0].astype(int))
    assert np.abs(_px(steered) - _px(plain))[MASK == 255].mean() > 1


def test_a_request_checks_its_controlnets_against_the_model():
    from serve.config import default_config
    from serve.errors import InvalidField

    sdxl, flux = default_config().models
    control = ControlImage("canny", bytes(64 * 64 * 3))
    made = GenerationRequest.for_model(sdxl, "x", width=64, height=64, controls=(control,))
    assert made.mode == "txt2img" and made.batch_key != replace(made, controls=()).batch_key
    for model, controls in [(flux, (replace(control, name="pose"),)),
                            (sdxl, (replace(control, name="depth"),)),
                            (sdxl, (control,) * 4)]:
        with pytest.raises(InvalidField) as err:
            GenerationRequest.for_model(model, "x", width=64, height=64, controls=controls)
        assert err.value.field == "controlnets"


def test_a_models_version_pins_its_controlnets_weights(tmp_path, controlnet_path,
                                                       other_controlnet):
    from serve.config import ModelConfig
    from serve.versions import version_id

    def version(**controlnets):
        return version_id(ModelConfig(id="a/b", embedded="tiny-sdxl", controlnets=controlnets),
                          tmp_path)

    one = version(canny={"path": controlnet_path})
    assert one == version(canny={"path": controlnet_path})
    assert len({version(), one, version(canny={"path": other_controlnet}),
                version(canny={"path": controlnet_path, "conditioning_scale": 0.5})}) == 4


def test_guidance_cutoff_halves_the_controlnets_rows_and_withdrawal_follows(engine):
    """speed.cfg_cutoff drops the unconditional half of every guided input, the control
    images of both ControlNets with them; a request withdrawn after that leaves its rows."""
    batch = [_both(), _both(seed=9, num_outputs=2)]
    engine.cfg_cutoff = 0.5
    try:
        cut, cut_rows = _withdrawing(engine, batch, after=None, net="other")
        out, rows = _withdrawing(engine, batch, after=4, net="other")
    finally:
        engine.cfg_cutoff = None
    # 6 steps, guided through step index 3: 3 images x 2 rows, then 3 rows, then 1 row.
    assert cut_rows == [6, 6, 6, 6, 3, 3] and rows == [6, 6, 6, 6, 1, 1]
    assert [len(images) for images in out] == [1, 0]
    assert_same_pixels(out[0][0], cut[0][0])
    full = engine.generate(batch)[0][0]  # the last two steps unguided: measured 0.11 levels
    assert np.abs(_px(cut[0][0]) - _px(full)).mean() > 0.05


def test_the_refiner_finishes_a_controlnet_image_as_diffusers_two_pipelines_do(
        tiny_sdxl_path, cache_dir, controlnet_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_SDXL_REFINER

    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu",
                        refiner=ensure_embedded(TINY_SDXL_REFINER, cache_dir),
                        controlnets={"canny": (controlnet_path, None)})
    request = _req(SQUARE, 0.8, refine="expert_ensemble_refiner", high_noise_frac=0.5)
    ours = engine.generate([request])[0][0]
    base = StableDiffusionXLControlNetPipeline.from_pipe(
        engine.pipe, controlnet=ControlNetModel.from_pretrained(controlnet_path))
    base.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(5)]
    latents = base(prompt="a red cube", image=SQUARE, width=64, height=64,
                   num_inference_steps=6, guidance_scale=7.5,
                   controlnet_conditioning_scale=0.8, denoising_end=0.5,
                   output_type="latent", generator=generators).images
    theirs = engine.refiner(prompt="a red cube", image=latents, num_inference_steps=6,
                            denoising_start=0.5, guidance_scale=7.5,
                            generator=generators).images[0]
    assert_same_pixels(ours, theirs)
    unrefined = engine.generate([replace(request, refine="no_refiner")])[0][0]
    assert np.abs(_px(ours) - _px(unrefined)).mean() > 1


def test_an_sdxl_controlnet_that_preprocesses_depth_reads_the_pictures_depth_map(
        tiny_sdxl_path, controlnet_path, cache_dir):
    from deployments.engines.controlnets import NetFiles
    from deployments.engines.depth import DepthMaps
    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_DEPTH_ANYTHING

    estimator = ensure_embedded(TINY_DEPTH_ANYTHING, cache_dir)
    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu", depth_estimator=estimator,
                        controlnets={"depth": NetFiles(controlnet_path, estimates_depth=True),
                                     "map": NetFiles(controlnet_path)})
    picture = _shapes((8, 8, 30, 30))
    depth_map = DepthMaps(estimator, torch.float32, torch.device("cpu")).of(picture)
    from_picture = engine.generate([_req(picture, name="depth")])[0][0]
    assert_same_pixels(from_picture, engine.generate([_req(depth_map, name="map")])[0][0])
    assert np.abs(_px(from_picture) - _px(engine.generate([_req(picture, name="map")])[0][0])
                  ).mean() > 0.5


def test_controlnet_calls_rescale_guidance_as_diffusers_own_pipelines_do(
        tiny_sdxl_path, other_controlnet):
    """diffusers' ControlNet text-to-image and img2img pipelines take no guidance rescale;
    the engine rescales in a hook on the UNet. A ControlNet at scale 0 adds nothing to the
    UNet (it still runs: counted), so such a call then draws the plain pipeline's pixels
    with diffusers' own `guidance_rescale`, text-to-image and in the hires pass; at scale 1
    the rescale still changes the image."""
    from deployments.engines.sdxl import SDXLEngine
    from tests.unit.test_v_prediction import V_PRED

    nets = SDXLEngine(tiny_sdxl_path, "float32", "cpu", scheduler_options=V_PRED,
                      controlnets={"other": (other_controlnet, None)})
    rescaled = replace(BASE, guidance_rescale=0.7, num_inference_steps=4)
    runs, steered = [], []
    hook = nets.controlnets.nets["other"].register_forward_hook(lambda *a: runs.append(1))
    try:
        for request in (rescaled, replace(rescaled, hires_scale=1.5, hires_strength=0.5)):
            runs.clear()
            off = replace(request, controls=(ControlImage("other", SQUARE.tobytes(), 0.0),))
            steered.append(nets.generate([off])[0][0])
            assert len(runs) >= 4
            assert_same_pixels(steered[-1], nets.generate([request])[0][0])
    finally:
        hook.remove()
    plain = nets.generate([replace(rescaled, guidance_rescale=0.0)])[0][0]
    assert np.abs(_px(steered[0]) - _px(plain)).mean() > 1
    strong = (ControlImage("other", SQUARE.tobytes(), 1.0),)
    with_rescale, without = (nets.generate([replace(rescaled, controls=strong,
                                                    guidance_rescale=r)])[0][0]
                             for r in (0.7, 0.0))
    assert np.abs(_px(with_rescale) - _px(without)).mean() > 1
