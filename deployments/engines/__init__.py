"""One engine per model family behind the same small protocol."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from serve.adapters import AdapterEntry
from serve.config import ModelConfig, RefinerConfig
from serve.types import GenerationRequest

if TYPE_CHECKING:
    from deployments.adapters import AdapterSlots
    from deployments.engines.controlnets import NetFiles
    from deployments.engines.upscalers import UpscalerFile
    from deployments.fused_adapters import FusedAdapters


class Engine(Protocol):
    adapters: AdapterSlots | FusedAdapters

    def batch_key(self, request: GenerationRequest) -> tuple:
        """Requests with equal keys can share one call."""

    def check_request(self, request: GenerationRequest) -> None:
        """Raise InvalidField for what the request asks that the model cannot do."""

    def prepare(self, request: GenerationRequest) -> tuple[Any, bool]:
        """What the request's call needs (prompt embeddings, input image on the device),
        made ahead of it on any thread, and whether the embeddings were already held."""

    def generate(self, requests: Sequence[GenerationRequest],
                 withdrawn: Callable[[], set[int]] = ...,
                 on_step: Callable[[int, int], None] | None = None,
                 prepared: Sequence[Any] | None = None) -> list[list[Any]]:
        """One pipeline call for requests sharing a batch key; images per request.
        Requests whose indexes `withdrawn()` returns leave the call at the next step (no
        images); it stops once all have left. Reports each step to `on_step`. `prepared`
        holds the requests' `prepare` results (made in the call if not given)."""

    def warm_up(self, request: GenerationRequest, max_images: int = 1) -> None:
        """Run the calls that bring the engine to full speed (allocation, compilation)."""

    def check(self) -> None:
        """Raise if the engine can no longer serve."""

    def describe(self) -> dict:
        """Device, dtype and other facts for logs."""

    def tile_vae(self) -> None:
        """Decode and encode large images in tiles (the model's `vae_tiling`)."""

    def memory(self) -> tuple[str, int]:
        """(device name, bytes the model holds there) for the memory gauge."""


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but this replica sees no GPU")
    return requested


def model_path(model: ModelConfig, cache_dir: Path) -> Path:
    """The local folder to load: the configured path, the embedded model, built once, or
    a single-file checkpoint's folder, converted once."""
    if model.embedded is not None:
        from deployments.tiny import ensure_embedded

        return ensure_embedded(model.embedded, cache_dir)
    if model.configs_from is not None:
        from deployments.engines.loading import converted_checkpoint

        return converted_checkpoint(model.path, model.configs_from, cache_dir, model.family)
    return model.path


def compile_cache_dir(cache_dir: Path) -> Path:
    """Where compiled engines keep their compiled code (torch.compile's cache), beside the
    models: an engine reuses what earlier ones compiled, a restarted replica too."""
    return cache_dir / "compile"


def refiner_path(refiner: RefinerConfig, cache_dir: Path) -> Path:
    """The refiner's local folder: the configured path, the embedded one, built once, or
    a single-file refiner's folder, converted once."""
    if refiner.embedded is not None:
        from deployments.tiny import ensure_embedded

        return ensure_embedded(refiner.embedded, cache_dir)
    if refiner.configs_from is not None:
        from deployments.engines.loading import converted_checkpoint

        return converted_checkpoint(refiner.path, refiner.configs_from, cache_dir,
                                    "sdxl-refiner")
    return refiner.path


def controlnet_files(model: ModelConfig, cache_dir: Path) -> dict[str, NetFiles]:
    """Each ControlNet's local folder (the embedded one built once), weights variant, union
    mode and whether it preprocesses depth."""
    from deployments.engines.controlnets import NetFiles
    from deployments.tiny import ensure_embedded

    return {name: NetFiles(net.path or ensure_embedded(net.embedded, cache_dir), net.variant,
                           net.control_mode, net.preprocess == "depth")
            for name, net in model.controlnets.items()}


def ip_adapter_files(model: ModelConfig, cache_dir: Path) -> tuple | None:
    """The IP-Adapters' (folder, subfolder, weights, image encoder folder) as diffusers'
    load_ip_adapter takes them (the embedded one built once), `weights` the first's file
    or, with further ones, (name, file) pairs; or None."""
    from deployments.tiny import ensure_embedded

    adapter = model.ip_adapter
    if adapter is None:
        return None
    folder = adapter.path or ensure_embedded(adapter.embedded, cache_dir)
    subfolder, weight_name, encoder = adapter.layout(model.family)
    weights = adapter.weight_names(model.family) if adapter.extra else weight_name
    return folder, subfolder, weights, encoder


def upscaler_files(model: ModelConfig, cache_dir: Path) -> dict[str, UpscalerFile]:
    """Each upscaler's weights file (the embedded one built once) and tiles, by name."""
    from deployments.engines.upscalers import UpscalerFile
    from deployments.tiny import TINY_ESRGAN_FILE, ensure_embedded

    return {name: UpscalerFile(u.path or ensure_embedded(u.embedded, cache_dir)
                               / TINY_ESRGAN_FILE, u.tile, u.tile_pad)
            for name, u in model.upscalers.items()}


def merged_loras(model: ModelConfig) -> list[tuple[Path, float]]:
    """The LoRA files merged into the model's weights at load, each with its scale."""
    return [(lora.path, lora.scale) for lora in model.merged_loras]


def redux_folder(model: ModelConfig, cache_dir: Path) -> Path | None:
    """The FLUX.1 Redux folder of the model (the embedded one built once), or None."""
    from deployments.tiny import ensure_embedded

    redux = model.redux
    if redux is None:
        return None
    return redux.path or ensure_embedded(redux.embedded, cache_dir)


def depth_estimator_folder(model: ModelConfig, cache_dir: Path) -> Path | None:
    """The model's depth estimator folder (the embedded one built once), or None."""
    from deployments.tiny import ensure_embedded

    estimator = model.depth_estimator
    if estimator is None:
        return None
    return estimator.path or ensure_embedded(estimator.embedded, cache_dir)


def create_engine(model: ModelConfig, cache_dir: Path,
                  adapters: dict[str, AdapterEntry] | None) -> Engine:
    """Load the model's pipeline; `adapters` are the catalog entries that fit it."""
    path = model_path(model, cache_dir)
    device = resolve_device(model.device)
    if device == "cuda" and model.gpu_share < 1:
        import torch

        # Replicas sharing a GPU each keep to their share of its memory: past it, an
        # allocation fails in this replica (answered as out of memory), not in another's.
        torch.cuda.set_per_process_memory_fraction(model.gpu_share)
    engine = _family_engine(model, cache_dir, adapters, path, device)
    if model.vae_tiling:
        engine.tile_vae()
    return engine


def _family_engine(model: ModelConfig, cache_dir: Path,
                   adapters: dict[str, AdapterEntry] | None, path: Path, device: str) -> Engine:
    """The engine of the model's family, its parts loaded."""
    if model.family == "sdxl":
        from deployments.engines.sdxl import SDXLEngine

        refiner = model.refiner
        return SDXLEngine(path, model.dtype, device, model.variant, adapters,
                          model.max_loaded_adapters, model.max_lora_rank, model.lora_targets,
                          model.simulate_oom_above_images, model.speed,
                          compile_cache_dir(cache_dir), model.fuse_adapters,
                          refiner_path(refiner, cache_dir) if refiner else None,
                          refiner.variant if refiner else None,
                          controlnet_files(model, cache_dir), ip_adapter_files(model, cache_dir),
                          depth_estimator_folder(model, cache_dir),
                          model.scheduler_options.given(), merged_loras(model), model.vae,
                          [(e.path, e.token) for e in model.textual_inversions],
                          model.freeu and model.freeu.model_dump(), model.prompts.given(),
                          upscaler_files(model, cache_dir))
    if model.family == "flux":
        from deployments.engines.flux import (
            FluxControlEngine,
            FluxDepthEngine,
            FluxEngine,
            FluxFillEngine,
            FluxKontextEngine,
        )

        engine = {"kontext": FluxKontextEngine, "fill": FluxFillEngine,
                  "canny": FluxControlEngine, "depth": FluxDepthEngine}.get(model.flux_kind,
                                                                             FluxEngine)
        return engine(path, model.dtype, device, model.variant, model.simulate_oom_above_images,
                      adapters, model.max_loaded_adapters, model.max_lora_rank,
                      model.lora_targets, model.fuse_adapters, model.speed,
                      compile_cache_dir(cache_dir), redux_folder(model, cache_dir),
                      controlnets=controlnet_files(model, cache_dir),
                      ip_adapter=ip_adapter_files(model, cache_dir),
                      merged_loras=merged_loras(model), vae=model.vae,
                      depth_estimator=depth_estimator_folder(model, cache_dir),
                      upscalers=upscaler_files(model, cache_dir))
    raise ValueError(f"no engine for family {model.family!r}")
