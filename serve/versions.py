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


def version_id(model: ModelConfig, cache_dir: Path) -> str:
    """64 hex digits, stable while the weights and the generation config stay the same."""
    from deployments.tiny import RECIPE_VERSION

    h = hashlib.sha256()
    config = model.model_dump(mode="json", include={"family", "embedded", "variant", "dtype",
                                                    "defaults", "lora_targets", "refiner"})
    h.update(json.dumps(config, sort_keys=True).encode())
    refiner = model.refiner.path if model.refiner is not None else None
    if model.embedded is not None or (model.refiner and model.refiner.embedded):
        h.update(f"embedded-recipe-{RECIPE_VERSION}".encode())  # built deterministically
    _add_files(h, cache_dir, ((model.path, True), (model.configs_from, False), (refiner, True)))
    return h.hexdigest()


def checkpoint_key(checkpoint: Path, configs: Path, cache_dir: Path) -> str:
    """16 hex digits naming a single-file checkpoint read with the configs of a folder."""
    h = hashlib.sha256()
    _add_files(h, cache_dir, ((checkpoint, True), (configs, False)))
    return h.hexdigest()[:16]


def _add_files(h, cache_dir: Path, sources) -> None:
    """Hash the name and digest of each file of each (source, with its weights) pair: a
    single file, or a folder's files (without its weights when only its configs and
    tokenizers are read)."""
    cache = _DigestCache(cache_dir / "weight-digests.json")
    for source, weights in sources:
        if source is None:
            continue
        files = ([(source.name, source)] if source.is_file() else
                 [(p.relative_to(source).as_posix(), p) for p in sorted(source.rglob("*"))
                  if p.is_file() and (weights or p.suffix not in (".safetensors", ".bin"))])
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
