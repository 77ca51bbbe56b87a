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
import re
import tempfile
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from serve.adapters import AdapterEntry, AdapterInvalid, read_entry
from serve.config import ModelConfig
from serve.urls import host_allowed

log = logging.getLogger("ray.serve.atelier.adapters")

_HUB = "https://huggingface.co"
_REPO = re.compile(r"^[^/?#]+/[^/?#]+$")  # <owner>/<repo>
# Names LoRA trainers give their file, in order of preference (diffusers, ai-toolkit and
# Replicate's trainers, kohya).
_LORA_FILES = ("pytorch_lora_weights.safetensors", "lora.safetensors")
_MAX_REDIRECTS = 5
_TIMEOUT = httpx.Timeout(30, connect=10)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DownloadSettings:
    """Where and from where a replica downloads LoRA files (the app's lora_* settings)."""

    folder: Path
    allowed_hosts: tuple[str, ...]
    max_bytes: int
    cache_bytes: int = 20 * 2**30  # the folder's size past which the least used files go


def download_file(url: str, dest: Path, allowed_hosts: tuple[str, ...], max_bytes: int,
                  token: str | None = None) -> None:
    """Save the file at `url` as `dest`, following redirects to allowed hosts only. A
    Hugging Face repository (`https://huggingface.co/<owner>/<repo>`) is first looked up
    for its LoRA file; huggingface.co stands for HF_ENDPOINT when that is set. `token`
    goes to the Hugging Face endpoint alone (never to the hosts it redirects to).

    Raises AdapterInvalid when the host is not allowed, the server does not answer 200,
    or the file is over `max_bytes`.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, httpx.Client(timeout=_TIMEOUT) as client:
            url = _on_hub(url)
            repo = url.removeprefix(_endpoint() + "/")
            if repo != url and _REPO.match(repo):
                url = _repo_file(client, repo, allowed_hosts, token)
            _stream_to(client, url, out, allowed_hosts, max_bytes, token)
        os.replace(part, dest)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise AdapterInvalid(f"could not download the LoRA at {url}: "
                             f"{type(exc).__name__}") from None
    finally:
        if os.path.exists(part):
            os.unlink(part)


def _endpoint() -> str:
    """Hugging Face's address: HF_ENDPOINT (a mirror) if set, as its own libraries read it."""
    return os.environ.get("HF_ENDPOINT", _HUB).rstrip("/")


def _on_hub(url: str) -> str:
    """`url` with huggingface.co replaced by the Hugging Face endpoint."""
    return _endpoint() + url.removeprefix(_HUB) if url.startswith(_HUB + "/") else url


def _repo_file(client: httpx.Client, repo: str, allowed_hosts: tuple[str, ...],
               token: str | None) -> str:
    """The download URL of Hugging Face repository `repo`'s LoRA file: its only top-level
    .safetensors file, or among several the one named as trainers name LoRA files.
    Raises AdapterInvalid when there is none, or no way to choose."""
    endpoint = _endpoint()
    api = f"{endpoint}/api/models/{repo}"
    if not host_allowed(api, allowed_hosts):
        raise AdapterInvalid(f"{urlsplit(api).hostname} is not in this server's "
                             "lora_allowed_hosts")
    response = client.get(api, headers=_auth(api, token))
    if response.status_code != 200:
        raise AdapterInvalid(f"looking up the Hugging Face repository {repo} gave HTTP "
                             f"{response.status_code}")
    try:
        files = [s["rfilename"] for s in response.json()["siblings"]]
    except (ValueError, KeyError, TypeError):
        raise AdapterInvalid(f"Hugging Face's answer for {repo} lists no files") from None
    names = sorted(n for n in files if n.endswith(".safetensors") and "/" not in n)
    chosen = names if len(names) == 1 else [n for n in _LORA_FILES if n in names][:1]
    if not chosen:
        raise AdapterInvalid(f"the Hugging Face repository {repo} has "
                             f"{len(names)} top-level .safetensors files ({', '.join(names)}); "
                             f"give one: https://huggingface.co/{repo}/resolve/main/<file>")
    return f"{endpoint}/{repo}/resolve/main/{chosen[0]}"


def _auth(url: str, token: str | None) -> dict:
    """The token goes to the Hugging Face endpoint alone, never to hosts it redirects to."""
    if token and url.startswith(_endpoint() + "/"):
        return {"Authorization": f"Bearer {token}"}
    return {}


def _stream_to(client: httpx.Client, url: str, out, allowed_hosts: tuple[str, ...],
               max_bytes: int, token: str | None) -> None:
    for _ in range(_MAX_REDIRECTS + 1):
        if not host_allowed(url, allowed_hosts):
            raise AdapterInvalid(f"the LoRA URL leads to {url}, whose host is not in this "
                                 "server's lora_allowed_hosts")
        with client.stream("GET", url, headers=_auth(url, token)) as response:
            if response.is_redirect:
                url = urljoin(url, response.headers["location"])
                continue
            if response.status_code != 200:
                raise AdapterInvalid(f"downloading the LoRA at {url} gave HTTP "
                                     f"{response.status_code}")
            size = int(response.headers.get("content-length") or 0)
            written = 0
            for chunk in response.iter_bytes(_CHUNK):
                written += len(chunk)
                if max(size, written) > max_bytes:
                    raise AdapterInvalid(f"the LoRA at {url} is over lora_download_max_mb "
                                         f"({max_bytes // 2**20} MB)")
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
            await run(download_file, url, path, s.allowed_hosts, s.max_bytes,
                      os.environ.get("HF_TOKEN"))
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
