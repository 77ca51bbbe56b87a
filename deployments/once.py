"""Folders built once per machine in the cache: embedded models and adapters, converted
checkpoints."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def built_once(target: Path, build: Callable[[Path], None]) -> Path:
    """The folder `target`, made by `build(folder)` unless it is there already.

    Concurrent callers (several replicas on one machine) build it once: the folder is
    written under a temporary name and renamed into place, complete, while a file lock is
    held.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                build(tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target
