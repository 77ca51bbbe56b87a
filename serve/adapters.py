"""LoRA adapters on the CPU side: the adapter-set value type and the catalog.

A request names catalog entries, built once at start from the configured folders, or gives
a LoRA file's URL on a host in `lora_allowed_hosts`, which replicas download under a name
made from the URL's hash. No request value ever becomes a filesystem path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serve.config import ModelConfig
from serve.errors import AtelierError, InvalidField

log = logging.getLogger("ray.serve.atelier.adapters")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # each part of a catalog name
_NAME_PARTS = 3  # <name>, <owner>/<model>, <owner>/<model>/<version>
_PROMPT_TAG = re.compile(r"<lora:([^:>]*)(?::([^>]*))?>")
_MAX_HEADER = 64 * 1024 * 1024


class AdapterNotFound(AtelierError):
    status = 404
    kind = "adapter_not_found"

    def __init__(self, name: str):
        super().__init__(f"adapter {name!r} is not in the catalog (GET /v1/loras lists them)")


class AdapterInvalid(AtelierError):
    """The adapter's file cannot be used with this model (corrupt, wrong format or shape)."""

    status = 422
    kind = "adapter_invalid"


@dataclass(frozen=True)
class AdapterSet:
    """Adapters and their scales in canonical (name) order; empty means the base model.

    `key` is the canonical string form ("a@0.8+b@1"), used as Serve's multiplexed model id.
    `urls` maps the names of adapters given by URL to their URLs, for the replica that
    downloads them; the set's identity is its items alone.
    """

    items: tuple[tuple[str, float], ...] = ()
    urls: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, float]],
           urls: Iterable[tuple[str, str]] = ()) -> AdapterSet:
        """Raises ValueError if a name appears twice."""
        items = tuple(sorted((name, round(float(scale), 4)) for name, scale in pairs))
        names = [name for name, _ in items]
        if len(set(names)) != len(names):
            raise ValueError("an adapter is named twice")
        return cls(items, tuple(sorted(set(urls))))

    @classmethod
    def from_key(cls, key: str) -> AdapterSet:
        """Inverse of `key`. Raises ValueError for a malformed key."""
        if not key:
            return cls()
        pairs = []
        for part in key.split("+"):
            name, _, scale = part.rpartition("@")
            pairs.append((name, float(scale)))
        return cls.of(pairs)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.items]

    @property
    def scales(self) -> list[float]:
        return [scale for _, scale in self.items]

    @property
    def key(self) -> str:
        return "+".join(f"{name}@{scale:g}" for name, scale in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    path: str
    base: str
    default_scale: float
    rank: int
    layout: str  # "peft" (diffusers/PEFT keys) or "kohya"
    url: str = ""  # where a downloaded adapter came from

    @property
    def label(self) -> str:
        """How messages name it: the catalog name, or the URL the request gave."""
        return self.url or repr(self.name)

    def problem_with(self, model: ModelConfig) -> str | None:
        """Why this adapter cannot serve `model`, or None when it can."""
        if self.base not in (model.id, model.family, *model.aliases):
            return f"adapter {self.label} is for {self.base}, not {model.id}"
        if self.rank > model.max_lora_rank:
            return (f"adapter {self.label} has rank {self.rank}, above this model's "
                    f"max_lora_rank {model.max_lora_rank}")
        return None


def adapter_url(ref: str) -> str | None:
    """The http(s) URL a reference gives, or None for a catalog name. Replicate's
    scheme-less `huggingface.co/...` and `civitai.com/...` forms are read as https (a
    CivitAI model page's file is found by the replica). On Hugging Face, a file's page
    (`/blob/`) becomes its download (`/resolve/`); a repository (`huggingface.co/<owner>/
    <repo>`) stays as it is, for the replica to find its LoRA file. Raises
    InvalidField("loras") for any other Hugging Face page."""
    ref = ref.strip().rstrip("/")
    if ref.startswith(("huggingface.co/", "civitai.com/")):
        ref = f"https://{ref}"
    if not ref.startswith(("http://", "https://")):
        return None
    parts = ref.split("/")
    if parts[2] != "huggingface.co" or len(parts) == 5:
        return ref
    if parts[5:6] == ["blob"]:
        parts[5] = "resolve"
    if parts[5:6] != ["resolve"] or len(parts) < 8:
        raise InvalidField("loras", "give a Hugging Face repository (huggingface.co/<owner>/"
                                    "<repo>) or one of its files (.../resolve/main/<file>)")
    return "/".join(parts)


def url_adapter_name(url: str) -> str:
    """The name an adapter given by URL goes by: the same on every replica and ingress."""
    return f"url-{hashlib.sha256(url.encode()).hexdigest()[:24]}"


def split_prompt_tags(prompt: str) -> tuple[str, list[tuple[str, float | None]]]:
    """Remove A1111-style `<lora:name:weight>` tags; return the prompt and (name, weight).

    Raises InvalidField("prompt") for a tag whose weight is not a number.
    """
    tags: list[tuple[str, float | None]] = []
    for name, weight in _PROMPT_TAG.findall(prompt):
        try:
            tags.append((name.strip(), float(weight) if weight.strip() else None))
        except ValueError:
            raise InvalidField("prompt", f"lora tag weight {weight!r} is not a number") from None
    cleaned = " ".join(_PROMPT_TAG.sub(" ", prompt).split())
    return cleaned, tags


def read_entry(path: Path, base: str, default_scale: float,
               name: str | None = None) -> AdapterEntry:
    """Describe one LoRA file from its safetensors header, without loading tensors; it
    goes by `name` (default: the file's name without .safetensors).

    Raises ValueError if the file is not a readable safetensors LoRA.
    """
    header = safetensors_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    downs = sorted(k for k in tensors if k.endswith(("lora_A.weight", "lora_down.weight")))
    if not downs:
        raise ValueError("no LoRA weights (lora_A/lora_down) in the file")
    layout = "kohya" if any(k.startswith("lora_unet_") for k in tensors) else "peft"
    rank = int(tensors[downs[0]]["shape"][0])
    return AdapterEntry(name or path.stem, str(path), base, default_scale, rank, layout)


def _files(folder: Path, levels: int) -> Iterator[Path]:
    """The files of `folder` and of its subfolders, `levels` deep in all, in name order."""
    for path in sorted(folder.iterdir()):
        if path.is_file():
            yield path
        elif path.is_dir() and levels > 1:
            yield from _files(path, levels - 1)


def safetensors_header(path: Path) -> dict:
    """A safetensors file's header: each tensor's dtype, shape and offsets, read without
    the tensors. Raises ValueError if the file is not one."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file too short for a safetensors header")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER:
            raise ValueError("safetensors header too large")
        data = f.read(size)
    try:
        header = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a safetensors file") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file")  # noqa: TRY004 - bad content, not a bad call
    return header


class AdapterCatalog:
    """The adapters that requests may name, scanned once from the configured folders."""

    def __init__(self, entries: Iterable[AdapterEntry] = ()):
        self.entries: dict[str, AdapterEntry] = {}
        for entry in entries:
            if entry.name in self.entries:
                raise ValueError(f"adapter name {entry.name!r} appears in two folders")
            self.entries[entry.name] = entry

    @classmethod
    def scan(cls, folders: Iterable[tuple[Path, str, float]]) -> AdapterCatalog:
        """Catalog every `*.safetensors` LoRA in each (folder, base, default_scale), and
        in its subfolders: a file goes by its path in the folder, so that
        `fofr/flux-80s-cyberpunk.safetensors` answers Replicate's model references
        (`<owner>/<model>`, `<owner>/<model>/<version>`).

        Other files and unreadable ones are left out with a warning: they can never load.
        """
        entries = []
        for folder, base, default_scale in folders:
            for path in _files(folder, levels=_NAME_PARTS):
                parts = (*path.relative_to(folder).parent.parts, path.stem)
                if path.suffix != ".safetensors" or not all(NAME.match(p) for p in parts):
                    log.warning("not an adapter (only <name>.safetensors load): %s", path)
                    continue
                try:
                    entries.append(read_entry(path, base, default_scale, "/".join(parts)))
                except (OSError, ValueError) as exc:
                    log.warning("adapter %s left out: %s", path, exc)
        return cls(entries)

    def to_dicts(self) -> list[dict]:
        return [asdict(e) for e in self.entries.values()]

    @classmethod
    def from_dicts(cls, rows: Iterable[Mapping]) -> AdapterCatalog:
        return cls(AdapterEntry(**row) for row in rows)

    def get(self, name: str) -> AdapterEntry:
        """Raises AdapterNotFound for any name not in the catalog."""
        try:
            return self.entries[name]
        except KeyError:
            raise AdapterNotFound(name) from None
