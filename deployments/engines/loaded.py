"""What an engine holds once loaded: the family's pipelines (sharing one set of modules),
LoRA files merged into the weights, the speed settings applied, the ControlNets and depth
estimator, and the facts and checks a replica reports of them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import psutil
import torch

from deployments.adapters import AdapterSlots
from deployments.engines.loading import load_pipeline, load_vae, quiet, share_modules
from deployments.engines.prompts import PromptCache
from deployments.engines.speed import apply_speed
from deployments.fused_adapters import FusedAdapters
from serve.config import SpeedConfig

if TYPE_CHECKING:
    from deployments.engines.controlnets import ControlNets, NetFiles
    from deployments.engines.depth import DepthMaps
    from deployments.engines.image_prompts import ImagePrompts

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LoadedPipelines:
    """The loading part of an engine (`DiffusersEngine`), which makes its adapters and
    encodes its prompts (`_encode_prompt`)."""

    # mode (txt2img first) → pipeline class; the others share the first one's modules.
    pipelines: ClassVar[dict[str, type]]
    denoiser: ClassVar[str]  # the pipeline attribute that runs every step
    parts: ClassVar[tuple[str, ...]]  # modules a usable pipeline must have
    adapters: AdapterSlots | FusedAdapters
    buckets: tuple[int, ...] = ()  # image counts calls are padded up to (none: as they come)
    attention: str = "auto"  # the order fused attention kernels are tried in (speed.py)
    cfg_cutoff: float | None = None  # fraction of the steps guided (speed.cfg_cutoff)
    image_prompts: ImagePrompts | None = None  # the model's IP-Adapter, if it has one
    controlnets: ControlNets | None = None  # the model's ControlNets, if its family has any
    depth_maps: DepthMaps | None = None  # the model's depth estimator, if it has one
    merged_loras: tuple[str, ...] = ()  # the LoRA files merged into the weights at load

    def __init__(self, path: Path, dtype: str, device: str, variant: str | None,
                 simulate_oom_above_images: int | None, vae: Path | None = None):
        """Load the family's pipelines from `path`, with the VAE of the folder `vae` in
        place of the checkpoint's (which is then not read) if one is given."""
        self.simulate_oom_above_images = simulate_oom_above_images
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype] if self.device.type == "cuda" else torch.float32
        first, *others = self.pipelines.items()
        given = {} if vae is None else {"vae": load_vae(vae, self.dtype)}
        self.pipe = load_pipeline(first[1], path, self.dtype, variant, **given).to(self.device)
        self.vae_folder = vae
        self._pipes = {first[0]: self.pipe}
        self._pipes |= share_modules(self.pipe, dict(others), self.dtype)
        for pipe in self._pipes.values():
            quiet(pipe)
        self.speed: dict = {}  # the speed settings applied (`speed_up`), for describe()

    def merge_loras(self, loras: Sequence[tuple[Path, float]]) -> None:
        """Merge LoRA files into the weights for good (the model's `merged_loras`, each
        (file, scale)), as diffusers' load_lora_weights and fuse_lora do, then drop their
        layers: the modules every pipeline of the engine shares keep the merged weights.
        Called before the adapters' slots and the speed settings change the layers."""
        for i, (path, scale) in enumerate(loras):
            name = f"merged-{i}"
            self.pipe.load_lora_weights(str(path.parent), weight_name=path.name,
                                        adapter_name=name, local_files_only=True)
            self.pipe.fuse_lora(lora_scale=scale, adapter_names=[name])
            self.pipe.unload_lora_weights()
        self.merged_loras = tuple(path.name for path, _ in loras)

    def speed_up(self, speed: SpeedConfig, compile_cache: Path) -> None:
        """Apply the model's speed settings (after its adapters are in place), then let
        the adapters find the layers the settings left; prompts are encoded with the
        adapters' text-encoder parts."""
        self.prompts = PromptCache(self._encode_prompt, adapters=self.adapters.text)
        self.buckets = tuple(speed.batch_buckets)
        self.attention = speed.attention
        self.cfg_cutoff = speed.cfg_cutoff
        denoiser = getattr(self.pipe, self.denoiser)
        self.speed = apply_speed(self.pipe, denoiser, speed, compile_cache)
        self.calibrating = speed.fp8 and speed.fp8_activations == "calibrated"
        self.extra_sizes = tuple(tuple(size) for size in speed.compile_sizes)
        self.adapters.bind(denoiser, compiled=bool(self.speed.get("compiled_blocks")))

    def memory(self) -> tuple[str, int]:
        """(device, bytes held): torch's allocated GPU memory, or the process's resident
        memory on CPU."""
        if self.device.type == "cuda":
            return str(self.device), torch.cuda.memory_allocated(self.device)
        return "cpu", psutil.Process().memory_info().rss

    def describe(self) -> dict:
        """The engine's facts: device and dtype, the dtype each module's weights are in
        (the ControlNets' and the IP-Adapter's image encoder's after the pipeline's),
        adapters, speed settings, merged LoRAs and the VAE folder given, if one was."""
        merged = isinstance(self.adapters, FusedAdapters)
        weights = {part: _name(next(getattr(self.pipe, part).parameters()).dtype)
                   for part in self.parts}  # as they are, whatever loading meant them to be
        if self.controlnets is not None:
            weights |= self.controlnets.weights()
        if self.image_prompts is not None:
            encoder = self.pipe.image_encoder
            weights["ip-adapter image_encoder"] = _name(next(encoder.parameters()).dtype)
        return {"device": str(self.device), "dtype": _name(self.dtype), "weights": weights,
                "vae_scale_factor": self.pipe.vae_scale_factor,
                "adapters": "merged" if merged else "slots", "speed": self.speed,
                "merged_loras": self.merged_loras,
                "vae": None if self.vae_folder is None else str(self.vae_folder),
                "vae_tiling": self.pipe.vae.use_tiling}

    def tile_vae(self) -> None:
        """Decode and encode images larger than the VAE's sample size in overlapping tiles
        that blend (diffusers' enable_tiling; the model's `vae_tiling`), so the VAE's
        memory stays that of its sample size whatever the image's. Every pipeline of the
        engine shares the VAE."""
        self.pipe.vae.enable_tiling()

    def _load_controlnets(self, nets: Mapping[str, NetFiles] | None,
                          depth_estimator: Path | None, classes: tuple[type, type, dict]) -> None:
        """The model's depth estimator, if it has one, and its ControlNets; `classes`: the
        family's ControlNet class, its class of several combined, and the ControlNet
        pipeline of each mode."""
        from deployments.engines.controlnets import ControlNets

        if depth_estimator is not None:  # transformers' depth models, imported only then
            from deployments.engines.depth import DepthMaps

            self.depth_maps = DepthMaps(depth_estimator, self.dtype, self.device)
        self.controlnets = ControlNets(self.pipe, nets or {}, self.dtype, self.device,
                                       *classes, self.depth_maps)

    def check(self) -> None:
        """Raise RuntimeError if the pipeline cannot run (missing parts, weights gone bad)."""
        for name in self.parts:
            if getattr(self.pipe, name, None) is None:
                raise RuntimeError(f"pipeline has no {name}")
        probe = next(getattr(self.pipe, self.denoiser).parameters())
        if probe.device.type != self.device.type or not torch.isfinite(probe).all():
            raise RuntimeError(f"{self.denoiser} weights are not usable on the expected device")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
