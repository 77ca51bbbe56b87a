"""LoRA files given by URL: downloaded once per node into the cache folder, then served
like catalog entries.

The ingress has already checked the URL's host against `lora_allowed_hosts`; the replica
checks it again, and every redirect too, so a listed host cannot send it elsewhere. A
file is written under a temporary name and renamed when whole, so a cut or refused
download leaves nothing behind; the folder is kept under a size by deleting the least
recently used files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urljoin

import httpx

from deployments.lora_sources import auth_headers, file_url
from serve.adapters import AdapterEntry, AdapterInvalid, read_entry
from serve.config import ModelConfig
from serve.urls import host_allowed

log = logging.getLogger("ray.serve.atelier.adapters")

_MAX_REDIRECTS = 5
_TIMEOUT = httpx.Timeout(30, connect=10)  # per connection and per read
_DOWNLOAD_TOTAL_S = 600  # the whole download: a host trickling bytes holds a thread no longer


@dataclass(frozen=True)
class DownloadSettings:
    """Where and from where a replica downloads LoRA files (the app's lora_* settings)."""

    folder: Path
    allowed_hosts: tuple[str, ...]
    max_bytes: int
    cache_bytes: int = 20 * 2**30  # the folder's size past which the least used files go


def download_file(url: str, dest: Path, allowed_hosts: tuple[str, ...],
                  max_bytes: int) -> None:
    """Save the LoRA file of reference `url` as `dest`, following redirects to allowed
    hosts only. A Hugging Face repository or a CivitAI model page is looked up for its
    file first (`deployments.lora_sources`, which also says which token goes where).

    Raises AdapterInvalid when the host is not allowed, the server does not answer 200,
    the file is over `max_bytes`, or the download takes over _DOWNLOAD_TOTAL_S.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=".part")
    deadline = time.monotonic() + _DOWNLOAD_TOTAL_S
    try:
        with os.fdopen(fd, "wb") as out, httpx.Client(timeout=_TIMEOUT) as client:
            url = file_url(client, url, allowed_hosts)
            _stream_to(client, url, out, allowed_hosts, max_bytes, deadline)
        os.replace(part, dest)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise AdapterInvalid(f"could not download the LoRA at {url}: "
                             f"{type(exc).__name__}") from None
    finally:
        if os.path.exists(part):
            os.unlink(part)


def _stream_to(client: httpx.Client, url: str, out, allowed_hosts: tuple[str, ...],
               max_bytes: int, deadline: float) -> None:
    for _ in range(_MAX_REDIRECTS + 1):
        if not host_allowed(url, allowed_hosts):
            raise AdapterInvalid(f"the LoRA URL leads to {url}, whose host is not in this "
                                 "server's lora_allowed_hosts")
        with client.stream("GET", url, headers=auth_headers(url)) as response:
            if response.is_redirect:
                url = urljoin(url, response.headers["location"])
                continue
            if response.status_code != 200:
                raise AdapterInvalid(f"downloading the LoRA at {url} gave HTTP "
                                     f"{response.status_code}")
            size = int(response.headers.get("content-length") or 0)
            written = 0
            for chunk in response.iter_bytes():  # each read as it comes
                written += len(chunk)
                if max(size, written) > max_bytes:
                    raise AdapterInvalid(f"the LoRA at {url} is over lora_download_max_mb "
                                         f"({max_bytes // 2**20} MB)")
                if time.monotonic() > deadline:
                    raise AdapterInvalid(f"downloading the LoRA at {url} took over "
                                         f"{_DOWNLOAD_TOTAL_S}s ({written} bytes came)")
                out.write(chunk)
            return
    raise AdapterInvalid(f"the LoRA URL redirects more than {_MAX_REDIRECTS} times")


class AdapterDownloads:
    """The adapters of one replica given by URL: each downloaded at most once at a time,
    and kept in `settings.folder` for later requests and restarts."""

    def __init__(self, settings: DownloadSettings):
        self.settings = settings
        self._pending: dict[str, asyncio.Future] = {}

    async def add(self, urls: Iterable[tuple[str, str]], catalog: dict[str, AdapterEntry],
                  held: Collection[str], model: ModelConfig,
                  run: Callable[..., asyncio.Future]) -> None:
        """Put each (name, url) adapter in `catalog` for `model`, unless `held` already
        (in memory) or listed with its file still on disk. Raises AdapterInvalid for a
        file that cannot be had or does not fit the model."""
        for name, url in urls:
            if name in held:
                continue
            known = catalog.get(name)
            if known is not None and Path(known.path).exists():
                Path(known.path).touch()  # the folder is trimmed by last use
                continue
            entry = await self.entry(name, url, model.id, run)
            problem = entry.problem_with(model)
            if problem is not None:
                raise AdapterInvalid(problem)
            catalog[name] = entry

    async def entry(self, name: str, url: str, base: str,
                    run: Callable[..., asyncio.Future]) -> AdapterEntry:
        """The catalog entry for adapter `name` at `url`, downloading it (with `run`, which
        runs a blocking call off the event loop) unless it is on disk already. Requests for
        an adapter being downloaded wait for that download. Raises AdapterInvalid."""
        path = self.settings.folder / f"{name}.safetensors"
        if path.exists():
            path.touch()  # the folder is trimmed by last use
        else:
            task = self._pending.get(name)
            if task is None:
                task = self._pending[name] = asyncio.ensure_future(
                    self._download(name, url, path, run))
            await asyncio.shield(task)  # one caller giving up does not stop the others'
        try:
            return replace(read_entry(path, base, 1.0), url=url)
        except (OSError, ValueError) as exc:
            path.unlink(missing_ok=True)  # a file that is not a LoRA is not kept
            raise AdapterInvalid(f"the file at {url} is not a safetensors LoRA: {exc}") from None

    async def _download(self, name: str, url: str, path: Path,
                        run: Callable[..., asyncio.Future]) -> None:
        s = self.settings
        log.info("downloading LoRA %s to %s", url, path)
        try:
            await run(download_file, url, path, s.allowed_hosts, s.max_bytes)
            await run(trim_folder, s.folder, s.cache_bytes, path)
        finally:
            del self._pending[name]


def trim_folder(folder: Path, max_bytes: int, keep: Path) -> list[Path]:
    """Delete the least recently used LoRA files of `folder` (never `keep`) until the rest
    fit in `max_bytes`; return the deleted paths. A replica holding a deleted adapter keeps
    it in memory; one that needs it again downloads it again."""
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    deleted = []
    for path in files:
        if total <= max_bytes:
            break
        if path != keep:
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
            deleted.append(path)
    if deleted:
        log.info("LoRA downloads over %d MB: deleted %s", max_bytes // 2**20,
                 ", ".join(p.name for p in deleted))
    return deleted
