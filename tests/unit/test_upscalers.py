"""ESRGAN-family upscalers for the hires pass (`upscalers`, `hires_upscaler`), on CPU: the
file layouts they are shared in load to the same network, the network's plumbing (scales
4 and 2), the hires pass as diffusers' pipelines draw it around the upscaled images, and
the requests and configs refused."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from deployments.engines.upscalers import (
    RRDBNet,
    UpscalerFile,
    load_upscaler,
    read_state,
    upscaled,
)
from serve.config import ConfigError, ModelConfig, parse_config
from serve.errors import InvalidField
from serve.types import GenerationRequest
from serve.versions import version_id
from tests.unit.test_engine import _px, assert_same_pixels
from tests.unit.test_hires import REQUEST as HIRES
from tests.unit.test_hires import diffusers_hires

REQUEST = replace(HIRES, hires_upscaler="esrgan")  # the hires tests' request, upscaled


def _original_layout(state: dict, blocks: int) -> dict:
    """Real-ESRGAN's names as the original ESRGAN code's flattened Sequential names them."""
    names = {"conv_first.": "model.0.", "conv_body.": f"model.1.sub.{blocks}.",
             "conv_up1.": "model.3.", "conv_up2.": "model.6.", "conv_hr.": "model.8.",
             "conv_last.": "model.10."}
    out = {}
    for key, tensor in state.items():
        if key.startswith("body."):
            _, block, rdb, conv, kind = key.split(".")
            out[f"model.1.sub.{block}.RDB{rdb[-1]}.{conv}.0.{kind}"] = tensor
        else:
            prefix = next(p for p in names if key.startswith(p))
            out[names[prefix] + key[len(prefix):]] = tensor
    return out


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(3)
    return RRDBNet(scale=4, features=8, blocks=2, growth=4).eval()


def test_every_layout_loads_the_same_network(net, tmp_path):
    from safetensors.torch import save_file

    state = net.state_dict()
    torch.save({"params_ema": state, "params": {}}, tmp_path / "real.pth")
    torch.save({"params": state}, tmp_path / "params.pth")
    torch.save(_original_layout(state, 2), tmp_path / "original.pth")
    save_file(_original_layout(state, 2), tmp_path / "original.safetensors")
    save_file(state, tmp_path / "real.safetensors")
    image = torch.rand(1, 3, 16, 24)
    with torch.inference_mode():
        expected = net(image)
    assert expected.shape == (1, 3, 64, 96)
    for name in ("real.pth", "params.pth", "original.pth", "original.safetensors",
                 "real.safetensors"):
        loaded = load_upscaler(tmp_path / name, "cpu", torch.float32)
        assert (loaded.scale, len(loaded.body)) == (4, 2)
        with torch.inference_mode():
            assert torch.equal(loaded(image), expected), name


def _identity_like(scale: int) -> RRDBNet:
    """Every residual branch zero and every other convolution passing the first three
    channels through: the network is then its upsampling alone."""
    net = RRDBNet(scale=scale, features=8, blocks=1, growth=4)
    with torch.no_grad():
        for conv in net.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.zero_()
                conv.bias.zero_()
        folded = (4 // scale) ** 2  # channel c of pixel (0, 0) of each block: c x folded
        for conv, step in ((net.conv_first, folded), (net.conv_up1, 1), (net.conv_up2, 1),
                           (net.conv_hr, 1), (net.conv_last, 1)):
            for c in range(3):
                conv.weight[c, c * step, 1, 1] = 1
    return net.eval()


@pytest.mark.parametrize("scale", [4, 2])
def test_the_network_upsamples_nearest_twice_after_folding_pixel_blocks(scale):
    """x4: nearest x4; x2: each 2x2 block's first pixel (pixel unshuffle's first channel
    of each colour), then nearest x4, so the output is twice the input's size."""
    image = torch.rand(1, 3, 8, 12)
    with torch.inference_mode():
        out = _identity_like(scale)(image)
    step = 4 // scale
    expected = F.interpolate(image[..., ::step, ::step], scale_factor=4, mode="nearest")
    assert out.shape == (1, 3, 8 * scale, 12 * scale) and torch.equal(out, expected)


def test_upscaled_images_are_brought_to_the_size_by_area_or_grown_bicubically():
    image = torch.rand(2, 3, 8, 8)
    net = _identity_like(4)
    big = F.interpolate(image, scale_factor=4, mode="nearest")
    assert torch.allclose(upscaled(net, image, (12, 12)),
                          F.interpolate(big, size=(12, 12), mode="area"))
    assert torch.equal(upscaled(net, image, (32, 32)), big)
    half = F.interpolate(image[..., ::2, ::2], scale_factor=4, mode="nearest")  # x2 net
    grown = F.interpolate(half, size=(40, 40), mode="bicubic").clamp(0, 1)
    assert torch.allclose(upscaled(_identity_like(2), image, (40, 40)), grown)


def test_a_file_of_another_network_is_refused_with_its_reason(tmp_path):
    torch.save({"params_ema": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an ESRGAN"):
        load_upscaler(tmp_path / "other.pth", "cpu", torch.float32)
    torch.save({"model.0.weight": torch.zeros(1), "model.99.weight": torch.zeros(1),
                "model.1.sub.0.RDB1.conv1.0.weight": torch.zeros(1)}, tmp_path / "x8.pth")
    with pytest.raises(ValueError, match="unexpected key 'model.99.weight'"):
        read_state(tmp_path / "x8.pth")


@pytest.fixture(scope="module")
def upscaling(tiny_sdxl_path, cache_dir):
    from deployments.engines.sdxl import SDXLEngine
    from deployments.tiny import TINY_ESRGAN, TINY_ESRGAN_FILE, ensure_embedded

    file = ensure_embedded(TINY_ESRGAN, cache_dir) / TINY_ESRGAN_FILE
    return SDXLEngine(tiny_sdxl_path, "float32", "cpu",
                      upscalers={"esrgan": UpscalerFile(file)}), file


def test_the_hires_pass_redraws_the_upscalers_images_as_diffusers_would(
        upscaling, tiny_sdxl_path, sdxl):
    """diffusers' text-to-image, the images through the upscaler file's network and
    brought to 96x96 by area, then diffusers' img2img over them with the same
    generators; the bicubic pass on the same engine is the plain engine's."""
    engine, file = upscaling
    reference = RRDBNet(4, 8, 2, 4).eval()
    reference.load_state_dict(torch.load(file, weights_only=True)["params_ema"])

    def upscale(drawn):
        with torch.inference_mode():
            big = reference(drawn).clamp(0, 1)
        return F.interpolate(big, size=(96, 96), mode="area").clamp(0, 1)

    theirs = diffusers_hires(tiny_sdxl_path, upscale)
    ours = engine.generate([replace(REQUEST, num_outputs=2)])[0]
    for a, b in zip(ours, theirs, strict=True):
        assert_same_pixels(a, b)
    bicubic = replace(REQUEST, hires_upscaler="bicubic")
    assert_same_pixels(engine.generate([bicubic])[0][0], sdxl.generate([bicubic])[0][0])
    assert np.abs(_px(ours[0]) - _px(engine.generate([bicubic])[0][0])).mean() > 1
    assert engine.batch_key(REQUEST) != engine.batch_key(bicubic)
    assert engine.describe()["upscalers"] == {"esrgan": "x4"}
    tiled = engine.generate([replace(REQUEST, tiling=True)])[0][0]
    assert tiled.size == (96, 96)


def _model(**extra) -> ModelConfig:
    upscalers = {"sharp": {"embedded": "tiny-esrgan"}, "soft": {"embedded": "tiny-esrgan"}}
    return ModelConfig(id="a/b", embedded="tiny-sdxl", defaults={"width": 512, "height": 512},
                       **({"upscalers": upscalers} | extra))


def test_requests_take_the_first_upscaler_unless_they_name_one():
    model = _model()
    assert GenerationRequest.for_model(model, "x", hires_scale=1.5).hires_upscaler == "sharp"
    named = GenerationRequest.for_model(model, "x", hires_scale=1.5, hires_upscaler="soft")
    assert named.hires_upscaler == "soft"
    assert GenerationRequest.for_model(model, "x", hires_scale=1.5,
                                       hires_upscaler="bicubic").hires_upscaler == "bicubic"
    assert GenerationRequest.for_model(model, "x", hires_upscaler="soft").hires_upscaler == ""
    plain = ModelConfig(id="a/b", embedded="tiny-sdxl", defaults={"width": 512, "height": 512})
    assert GenerationRequest.for_model(plain, "x", hires_scale=1.5).hires_upscaler == "bicubic"
    with pytest.raises(InvalidField, match="one of bicubic, sharp, soft") as caught:
        GenerationRequest.for_model(model, "x", hires_scale=1.5, hires_upscaler="lanczos")
    assert caught.value.field == "hires_upscaler"


@pytest.mark.parametrize(("model", "message"), [
    ({"family": "flux", "embedded": "tiny-flux-kontext", "kontext": True},
     "enlarges no images"),
    ({"upscalers": {"bicubic": {"embedded": "tiny-esrgan"}}}, "built-in upscaler"),
])
def test_configs_that_cannot_use_upscalers_are_refused(model, message):
    raw = {"id": "a/b", "embedded": "tiny-sdxl",
           "upscalers": {"sharp": {"embedded": "tiny-esrgan"}}} | model
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": [raw]})


def test_an_upscaler_path_must_be_a_weights_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for path in (tmp_path / "missing.pth", tmp_path / "notes.txt", tmp_path):
        config = parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl",
                                           "upscalers": {"sharp": {"path": str(path)}}}]})
        with pytest.raises(ConfigError, match=r"models\.0\.upscalers\.sharp\.path"):
            config.check_paths()


def test_upscalers_and_their_order_are_part_of_the_version(tmp_path):
    plain = ModelConfig(id="a/b", embedded="tiny-sdxl", defaults={"width": 512, "height": 512})
    swapped = ModelConfig(id="a/b", embedded="tiny-sdxl", defaults={"width": 512, "height": 512},
                          upscalers={"soft": {"embedded": "tiny-esrgan"},
                                     "sharp": {"embedded": "tiny-esrgan"}})
    ids = {version_id(m, tmp_path) for m in (plain, _model(), swapped)}
    assert len(ids) == 3


@pytest.mark.parametrize(("scale", "pad"), [(4, 20), (2, 40)])
@pytest.mark.parametrize("wrap", [False, True])
def test_tiles_read_with_the_networks_reach_around_them_meet_as_the_whole_image(
        scale, pad, wrap):
    """One block of a x4 network sees 19 input pixels around each one (x2: its folded
    pixel blocks, twice as far): tiles read with that much more meet without a seam, at
    the image's edges and across them for a tiling image. Read with none, they differ."""
    torch.manual_seed(5)
    net = RRDBNet(scale=scale, features=8, blocks=1, growth=4).eval()
    with torch.no_grad():  # outputs spread over [0, 1] rather than near 0
        net.conv_last.weight.mul_(20)
        net.conv_last.bias.fill_(0.5)
    image = torch.rand(1, 3, 40, 52)
    calls = []
    net.register_forward_hook(lambda _m, args, _o: calls.append(tuple(args[0].shape[-2:])))
    size = (40 * scale, 52 * scale)
    whole = upscaled(net, image, size, wrap)
    assert len(calls) == 1 and 0.1 < whole.std() and (0 < whole).logical_and(whole < 1).any()
    calls.clear()
    tiled = upscaled(net, image, size, wrap, tile=16, pad=pad)
    assert len(calls) == 3 * 4 and max(max(c) for c in calls) <= 16 + 2 * pad
    assert torch.allclose(tiled, whole, atol=1e-5)
    seams = upscaled(net, image, size, wrap, tile=16, pad=0)
    assert (seams - whole).abs().max() > 0.05


def test_an_image_within_one_tile_is_upscaled_whole(net):
    image = torch.rand(2, 3, 16, 12)
    assert torch.equal(upscaled(net, image, (64, 48), tile=16, pad=4),
                       upscaled(net, image, (64, 48)))


def test_tiles_are_set_per_upscaler_and_part_of_the_version(tmp_path, cache_dir):
    from deployments.engines import upscaler_files

    model = _model(upscalers={"sharp": {"embedded": "tiny-esrgan", "tile": 128},
                              "soft": {"embedded": "tiny-esrgan", "tile": 0, "tile_pad": 0}})
    files = upscaler_files(model, cache_dir)
    assert [(f.tile, f.pad) for f in files.values()] == [(128, 16), (0, 0)]
    assert files["sharp"].path.is_file() and files["sharp"].path == files["soft"].path
    assert version_id(model, tmp_path) != version_id(_model(), tmp_path)
    for bad in ({"tile": 30}, {"tile_pad": -4}, {"tile": 8192}):
        with pytest.raises(ConfigError, match=f"upscalers.sharp.{next(iter(bad))}"):
            parse_config({"models": [{"id": "a/b", "embedded": "tiny-sdxl", "upscalers": {
                "sharp": {"embedded": "tiny-esrgan"} | bad}}]})


def test_an_x2_networks_odd_sized_input_is_padded_and_the_padding_cut_off():
    """7 x 9 pixels through a x2 network (2 x 2 pixel blocks): 14 x 18 out, the pixels
    clear of the reflected edge as the even 6 x 8 crop gives them."""
    image = torch.rand(1, 3, 7, 9)
    out = upscaled(_identity_like(2), image, (14, 18))
    assert out.shape == (1, 3, 14, 18)
    assert torch.equal(out[..., :12, :16], upscaled(_identity_like(2), image[..., :6, :8],
                                                    (12, 16)))
