"""A model's ControlNets, by the names requests give: SDXL's (diffusers' ControlNetModel)
and FLUX's (FluxControlNetModel: InstantX's and Shakker Labs' designs). Each folder is
loaded once in the model's dtype, however many names read it: a FLUX union ControlNet
(one set of weights trained for several kinds of control image) is named once per mode
it serves, each name with its `control_mode`. Calls with ControlNets run the ControlNet
pipeline of their mode over the model's own modules, given the call's ControlNet (several:
combined) each time. A ControlNet may preprocess depth: its requests send pictures, whose
depth maps the replica estimates as it prepares them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from PIL import Image

from deployments.engines.loading import load_pipeline, quiet
from serve.steering import check_control_mode
from serve.types import ControlImage, GenerationRequest

if TYPE_CHECKING:
    from deployments.engines.depth import DepthMaps


class NetFiles(NamedTuple):
    """Where a named ControlNet's weights are, the union mode the name serves, and whether
    its control images are pictures whose depth maps the replica estimates."""

    folder: Path
    variant: str | None = None
    mode: int | None = None
    estimates_depth: bool = False


class ControlNets:
    def __init__(self, pipe, nets: Mapping[str, NetFiles | tuple], dtype: torch.dtype,
                 device: torch.device, model_class: type, combined_class: type,
                 pipelines: Mapping[str, type], depth_maps: DepthMaps | None = None):
        loaded: dict[tuple[Path, str | None], torch.nn.Module] = {}
        self.nets, self.modes = {}, {}
        self.depth_maps, self.depth_names = depth_maps, set()
        for name, files in nets.items():
            folder, variant, mode, estimates_depth = NetFiles(*files)
            if estimates_depth:
                if depth_maps is None:
                    raise ValueError(f"controlnets.{name}: it preprocesses depth, and the "
                                     "model has no depth estimator")
                self.depth_names.add(name)
            if (folder, variant) not in loaded:
                loaded[folder, variant] = load_pipeline(model_class, folder, dtype,
                                                        variant).to(device)
            self.nets[name] = loaded[folder, variant]
            self.modes[name] = check_mode(name, self.nets[name], mode)
        self._combined_class, self._combined = combined_class, {}
        self._pipes = {}
        first = next(iter(self.nets.values()), None)
        for kind, cls in pipelines.items() if first is not None else ():
            self._pipes[kind] = quiet(cls.from_pipe(pipe, controlnet=first, dtype=dtype))

    def __bool__(self) -> bool:
        return bool(self.nets)

    def pipe(self, request: GenerationRequest, mode: str | None = None):
        """The ControlNet pipeline of the request's mode (or `mode`), with its ControlNets
        set."""
        pipe = self._pipes[mode or request.mode]
        pipe.controlnet = self._net(tuple(c.name for c in request.controls))
        return pipe

    def _net(self, names: tuple[str, ...]):
        """The ControlNet of a call: the one named, or the named ones combined."""
        if len(names) == 1:
            return self.nets[names[0]]
        if names not in self._combined:
            self._combined[names] = self._combined_class([self.nets[n] for n in names])
        return self._combined[names]

    def with_depth_maps(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the depth map of each picture sent to a ControlNet that
        preprocesses depth as that ControlNet's control image."""
        if not any(c.name in self.depth_names for c in request.controls):
            return request
        size = (request.width, request.height)
        return replace(request, controls=tuple(
            replace(c, rgb=self.depth_maps.of(Image.frombytes("RGB", size, c.rgb)).tobytes())
            if c.name in self.depth_names else c for c in request.controls))

    def control_modes(self, request: GenerationRequest) -> int | list[int] | None:
        """The union modes of the request's ControlNets as the FLUX ControlNet pipelines
        take them: one's mode (None: not a union), or each one's (-1: none)."""
        modes = [self.modes[c.name] for c in request.controls]
        if len(modes) == 1:
            return modes[0]
        return [-1 if mode is None else mode for mode in modes]

    def weights(self) -> dict[str, str]:
        """Each name's weights dtype, as engines describe their modules."""
        return {f"controlnet {name}": str(next(net.parameters()).dtype).removeprefix("torch.")
                for name, net in self.nets.items()}

    def warm_requests(self, request: GenerationRequest) -> list[GenerationRequest]:
        """`request` once with each ControlNet, steered by a blank control image."""
        blank = bytes(request.width * request.height * 3)
        return [replace(request, num_outputs=1, controls=(ControlImage(name, blank),))
                for name in self.nets]


def check_mode(name: str, net: torch.nn.Module, mode: int | None) -> int | None:
    """`mode`, if it is one of the union ControlNet's modes (none if it is no union);
    ValueError naming `name` if not."""
    try:
        check_control_mode(getattr(net.config, "num_mode", None), mode)
    except ValueError as exc:
        raise ValueError(f"controlnets.{name}.{exc}") from None
    return mode

