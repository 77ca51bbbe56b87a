"""Model version ids: a content hash of a model's weights and generation config.

A version pins exactly what ran. Hashing gigabytes of weights takes seconds, so digests
are cached by (path, size, mtime) in the cache folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from serve.config import ModelConfig

_CHUNK = 8 * 2**20


def upscaling_version(version: str, alias: str) -> str:
    """The version of a model's upscaling alias (real-esrgan's inputs): its own, so that a
    prediction naming it alone runs under the alias, changing with the model's."""
    return hashlib.sha256(f"{version}/{alias}".encode()).hexdigest()


def version_id(model: ModelConfig, cache_dir: Path) -> str:
    """64 hex digits, stable while the weights and the generation config stay the same."""
    from deployments.tiny import RECIPE_VERSION

    h = hashlib.sha256()
    h.update(json.dumps(_hashed_config(model), sort_keys=True).encode())
    if _builds_embedded(model):
        h.update(f"embedded-recipe-{RECIPE_VERSION}".encode())  # built deterministically
    _add_files(h, cache_dir, _weight_files(model))
    return h.hexdigest()


def _hashed_config(model: ModelConfig) -> dict:
    """The part of the model's config that a version hashes. What was added after the
    first versions is left out while unset, so that the versions of configs without it
    stay as they were; files are named here and hashed by `_weight_files`."""
    config = model.model_dump(mode="json", include={"family", "embedded", "variant", "dtype",
                                                    "defaults", "lora_targets", "refiner",
                                                    "controlnets", "ip_adapter", "redux"})
    if model.scheduler_options.given():
        config["scheduler_options"] = model.scheduler_options.given()
    if not model.defaults.guidance_rescale:
        del config["defaults"]["guidance_rescale"]
    if model.merged_loras:  # their scales here, their files' bytes below
        config["merged_loras"] = [lora.scale for lora in model.merged_loras]
    if model.freeu is not None:
        config["freeu"] = model.freeu.model_dump()
    if model.styles:
        config["styles"] = {name: s.model_dump() for name, s in model.styles.items()}
    if model.prompts.given():
        config["prompts"] = model.prompts.given()
    if model.vae_tiling:
        config["vae_tiling"] = True
    if model.upscalers:  # their names, the default first (their files: below)
        config["upscalers"] = [[name, u.embedded, u.tile, u.tile_pad]
                               for name, u in model.upscalers.items()]
    if model.textual_inversions:  # their tokens here, their files' bytes below
        config["textual_inversions"] = [e.token for e in model.textual_inversions]
    ip = model.ip_adapter
    if ip is not None:  # its files as the family lays them out, given or not
        config["ip_adapter"] |= dict(zip(("subfolder", "weight_name", "image_encoder"),
                                         ip.layout(model.family), strict=True))
        if not ip.extra:
            del config["ip_adapter"]["extra"]
    return config


def _builds_embedded(model: ModelConfig) -> bool:
    """Whether any of the model's weights are embedded ones, built here from a recipe."""
    parts = (model.refiner, *model.controlnets.values(), model.ip_adapter, model.redux,
             *model.upscalers.values())
    return model.embedded is not None or any(part and part.embedded for part in parts)


def _weight_files(model: ModelConfig) -> tuple:
    """The (file or folder, which of its files to read) pairs of the model's weights."""
    refiner, ip, redux = model.refiner, model.ip_adapter, model.redux
    return ((model.path, _read_all), (model.configs_from, _READ_WITH_FILE[model.family]),
            (refiner and refiner.path, _read_all),
            (refiner and refiner.configs_from, _READ_WITH_FILE["sdxl"]),
            *((net.path, _read_all) for net in model.controlnets.values()),
            *_ip_adapter_files(ip, model.family),
            *((lora.path, _read_all) for lora in model.merged_loras),
            (model.vae, _read_all),
            *((e.path, _read_all) for e in model.textual_inversions),
            (redux and redux.path, _read_all),
            *((u.path, _read_all) for u in model.upscalers.values()))


def _ip_adapter_files(adapter, family: str) -> list:
    """An IP-Adapter's weights file and image encoder folder (not the rest of its folder,
    which may hold other adapters)."""
    if adapter is None or adapter.path is None:
        return []
    weights = adapter.weights_file(adapter.path, family)
    return [(weights, _read_all), (adapter.encoder_folder(adapter.path, family), _read_all),
            *((weights.parent / extra.weight_name, _read_all)
              for extra in adapter.extra.values())]


def checkpoint_key(checkpoint: Path, configs: Path, cache_dir: Path) -> str:
    """16 hex digits naming a single-file checkpoint read with the configs of a folder
    (where it is: a converted FLUX folder links the folder's other modules)."""
    h = hashlib.sha256(str(configs.resolve()).encode())
    _add_files(h, cache_dir, ((checkpoint, _read_all), (configs, _READ_WITH_FILE["sdxl"])))
    return h.hexdigest()[:16]


_WEIGHTS = (".safetensors", ".bin")


def _read_all(name: str) -> bool:
    return True


# Which files of the `configs_from` folder a single-file model reads: for SDXL (and a
# refiner) its configs, tokenizers and scheduler alone (the file holds every weight read),
# for FLUX also the weights of every module but the transformer (the file is the
# transformer).
_READ_WITH_FILE = {
    "sdxl": lambda name: not name.endswith(_WEIGHTS),
    "flux": lambda name: not name.endswith(_WEIGHTS) or (
        "/" in name and not name.startswith("transformer/")),
}


def _add_files(h, cache_dir: Path, sources) -> None:
    """Hash the name and digest of each file of each (source, read) pair: a single file,
    or the files of a folder for which `read(name within the folder)` is true."""
    cache = _DigestCache(cache_dir / "weight-digests.json")
    for source, read in sources:
        if source is None:
            continue
        files = ([(source.name, source)] if source.is_file() else
                 [(name, p) for p in sorted(source.rglob("*"))
                  if p.is_file() and read(name := p.relative_to(source).as_posix())])
        for name, path in files:
            h.update(name.encode())
            h.update(cache.digest(path).encode())
    cache.save()


class _DigestCache:
    def __init__(self, file: Path):
        self._file = file
        try:
            self._data = json.loads(file.read_text())
        except (OSError, ValueError):
            self._data = {}
        self._dirty = False

    def digest(self, path: Path) -> str:
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in self._data:
            h = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            self._data[key] = h.hexdigest()
            self._dirty = True
        return self._data[key]

    def save(self) -> None:
        if self._dirty:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            self._file.write_text(json.dumps(self._data))
