"""Depth maps of the requests' pictures: FLUX.1 Depth's control images, and those of the
ControlNets that preprocess depth.

Black Forest Labs made FLUX.1 Depth [dev]'s control maps with Depth Anything (relative
depth, near bright). Here the estimator's output is brought back to the picture's size
(bicubic) and stretched to the full 0–255 range; it runs on the replica's device, on the
thread that prepares a request beside the running call. The maps of the last pictures
are kept, so a picture sent again (five scenes of one product photo) is estimated once.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForDepthEstimation


class DepthMaps:
    """The depth estimator of `folder` (a transformers depth-estimation folder), on
    `device` in `dtype`."""

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device,
                 kept: int = 16):
        self._kept, self._maps, self._lock = kept, OrderedDict(), threading.Lock()
        self.model = AutoModelForDepthEstimation.from_pretrained(
            folder, dtype=dtype, local_files_only=True).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.device, self.dtype = device, dtype

    def of(self, picture: Image.Image) -> Image.Image:
        """The picture's depth map at its size: 8-bit grey as RGB, the nearest point 255
        and the farthest 0 (all 0 if the estimate is flat); estimated once while kept."""
        key = (picture.size, hashlib.blake2b(picture.tobytes(), digest_size=16).digest())
        with self._lock:
            if key in self._maps:
                self._maps.move_to_end(key)
                return self._maps[key]
        made = self._estimate(picture)
        with self._lock:
            self._maps[key] = made
            while len(self._maps) > self._kept:
                self._maps.popitem(last=False)
        return made

    @torch.inference_mode()
    def _estimate(self, picture: Image.Image) -> Image.Image:
        pixels = self.processor(images=picture, return_tensors="pt").pixel_values
        depth = self.model(pixel_values=pixels.to(self.device, self.dtype)).predicted_depth
        depth = F.interpolate(depth[:, None].float(), size=(picture.height, picture.width),
                              mode="bicubic", align_corners=False)[0, 0]
        low, high = depth.min(), depth.max()
        scaled = (depth - low) / (high - low) if high > low else torch.zeros_like(depth)
        grey = (scaled * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        return Image.fromarray(np.stack([grey] * 3, axis=-1))
