"""Image upscalers of the ESRGAN family (RRDBNet): Real-ESRGAN (RealESRGAN_x4plus, its x2
and anime models) and the community ESRGAN models shared in the original layout
(4x-UltraSharp, 4x_NMKD-Siax and the like), as the WebUI offers them to its hires. fix.
The hires pass upscales its first-pass images with one before redrawing them.

The network is xinntao's RRDBNet as Real-ESRGAN defines it: a first convolution, a trunk
of residual-in-residual dense blocks with a convolution and a skip around it, two nearest
x2 upsamplings each followed by a convolution, and two output convolutions; models of
scale 2 and 1 first fold each 2x2 or 4x4 pixel block into channels (pixel unshuffle), so
the same x4 body gives x2 or x1. Weights are read from Real-ESRGAN's `.pth` files (the
`params_ema` or `params` state dict), from original-layout `.pth` files (keys
`model.0...`), or from `.safetensors` in either layout; tensors only (never pickled code).
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from deployments.engines.tiling import circular_padding, resized

_OLD_NAMES = {"model.0.": "conv_first.", "model.3.": "conv_up1.", "model.6.": "conv_up2.",
              "model.8.": "conv_hr.", "model.10.": "conv_last."}
_OLD_BLOCK = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")
_OLD_TRUNK_END = re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)")


class _DenseBlock(nn.Module):
    """Five convolutions, each reading the block's input and every earlier output."""

    def __init__(self, features: int, growth: int):
        super().__init__()
        for i in range(5):
            out = features if i == 4 else growth
            setattr(self, f"conv{i + 1}", nn.Conv2d(features + i * growth, out, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = [x]
        for i in range(1, 5):
            seen.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(seen, 1)), 0.2))
        return self.conv5(torch.cat(seen, 1)) * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self, features: int, growth: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (_DenseBlock(features, growth) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """Real-ESRGAN's RRDBNet: images (N, 3, H, W) in [0, 1] to (N, 3, H x scale,
    W x scale)."""

    def __init__(self, scale: int = 4, features: int = 64, blocks: int = 23, growth: int = 32):
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError("an RRDBNet upscales by 1, 2 or 4")
        self.scale = scale
        folded = 3 * (4 // scale) ** 2
        self.conv_first = nn.Conv2d(folded, features, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(features, growth) for _ in range(blocks)))
        for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
            setattr(self, name, nn.Conv2d(features, features, 3, 1, 1))
        self.conv_last = nn.Conv2d(features, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale < 4:
            x = F.pixel_unshuffle(x, 4 // self.scale)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The network's state dict from an upscaler file, in Real-ESRGAN's key names."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("params_ema", "params"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    return _renamed(state) if "model.0.weight" in state else dict(state)


def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-layout (ESRGAN) keys as Real-ESRGAN names them. The trunk's closing
    convolution is the `model.1.sub` entry after the blocks."""
    blocks = 1 + max(int(m[1]) for k in state if (m := _OLD_BLOCK.fullmatch(k)))
    renamed = {}
    for key, tensor in state.items():
        if m := _OLD_BLOCK.fullmatch(key):
            renamed[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = tensor
        elif (m := _OLD_TRUNK_END.fullmatch(key)) and int(m[1]) == blocks:
            renamed[f"conv_body.{m[2]}"] = tensor
        elif prefix := next((p for p in _OLD_NAMES if key.startswith(p)), None):
            renamed[_OLD_NAMES[prefix] + key[len(prefix):]] = tensor
        else:
            raise ValueError(f"not an x4 ESRGAN (RRDBNet) file: unexpected key {key!r}")
    return renamed


def load_upscaler(path: Path, device: str | torch.device, dtype: torch.dtype) -> RRDBNet:
    """The RRDBNet of an upscaler file, its shape read from its weights, on `device`."""
    state = read_state(path)
    try:
        features, folded = state["conv_first.weight"].shape[:2]
        growth = state["body.0.rdb1.conv1.weight"].shape[0]
    except KeyError as missing:
        raise ValueError(f"{path}: not an ESRGAN (RRDBNet) upscaler: no {missing}") from None
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    scale = {3: 4, 12: 2, 48: 1}.get(folded)
    if scale is None:
        raise ValueError(f"{path}: an RRDBNet reading {folded} channels is not x1, x2 or x4")
    net = RRDBNet(scale, features, blocks, growth)
    net.load_state_dict(state, strict=True)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


class UpscalerFile(NamedTuple):
    """An upscaler's weights file and how it is run: tiles of at most `tile` x `tile`
    input pixels (0: the whole image at once), each read with `pad` more pixels around
    it whose output is thrown away."""

    path: Path
    tile: int = 0
    pad: int = 0


@torch.inference_mode()
def upscaled(net: RRDBNet, images: torch.Tensor, size: tuple[int, int],
             wrap: bool = False, tile: int = 0, pad: int = 0) -> torch.Tensor:
    """`images` (N, 3, H, W) in [0, 1] upscaled by the network, one at a time, then
    resized to `size` (height, width): by area where that shrinks them, as the WebUI
    brings a x4 model's output down to the hires size, bicubically where it still grows
    them. With `wrap`, a tiling image: its edges continue each other through the network
    and the resize. The result is float32.

    The network's activations at its output size are the memory it needs: with `tile`,
    an image larger than a tile is upscaled tile by tile as Real-ESRGAN's `--tile` does,
    each tile read with `pad` pixels of its surroundings (multiples of 4, so an x2 or x1
    network's folded pixel blocks line up). An x2 or x1 network's input whose sides are
    not multiples of its 2 or 4 pixel blocks is padded by reflection (wrapping round for
    a tiling image) and the padding's output cut off, as Real-ESRGAN does."""
    dtype, fold = next(net.parameters()).dtype, 4 // net.scale
    out = []
    for image in images:
        height, width = image.shape[-2:]
        image = F.pad(image[None].to(dtype), (0, -width % fold, 0, -height % fold),
                      mode="circular" if wrap else "reflect")
        if tile and max(image.shape[-2:]) > tile:
            big = _by_tiles(net, image, tile, pad, wrap)
        else:
            with circular_padding([net]) if wrap else nullcontext():
                big = net(image).float().clamp(0, 1)
        big = big[..., :height * net.scale, :width * net.scale]
        if tuple(big.shape[-2:]) != size:
            shrinks = big.shape[-2] >= size[0] and big.shape[-1] >= size[1]
            big = resized(big, size, "area" if shrinks else "bicubic", wrap).clamp(0, 1)
        out.append(big)
    return torch.cat(out)


def _by_tiles(net: RRDBNet, image: torch.Tensor, tile: int, pad: int,
              wrap: bool) -> torch.Tensor:
    """One image (1, 3, H, W) upscaled tile by tile into a float32 output. A tile's
    surroundings stop at the image's edges, where the network pads as it does for the
    whole image; a tiling image is first padded circularly by `pad`, so they continue
    across its edges."""
    height, width = image.shape[-2:]
    source, at = image, 0
    if wrap:
        pad = min(pad, height, width) // 4 * 4
        source, at = F.pad(image, (pad, pad, pad, pad), mode="circular"), pad
    s = net.scale
    out = image.new_empty(1, 3, height * s, width * s, dtype=torch.float32)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            y0, x0 = max(top + at - pad, 0), max(left + at - pad, 0)
            y1 = min(bottom + at + pad, source.shape[-2])
            x1 = min(right + at + pad, source.shape[-1])
            piece = net(source[..., y0:y1, x0:x1]).float().clamp(0, 1)
            dy, dx = (top + at - y0) * s, (left + at - x0) * s
            out[..., top * s:bottom * s, left * s:right * s] = \
                piece[..., dy:dy + (bottom - top) * s, dx:dx + (right - left) * s]
    return out
