"""Where the file of a LoRA given by a page rather than a file URL is, and which token
goes where.

- A Hugging Face repository (`https://huggingface.co/<owner>/<repo>`): its only top-level
  .safetensors file, or among several the one trainers name so. huggingface.co stands
  for HF_ENDPOINT when that is set (a mirror), as Hugging Face's own libraries read it;
  HF_TOKEN goes to it alone.
- A CivitAI model (`https://civitai.com/models/<id>[/<name>][?modelVersionId=<v>]`, the
  form Replicate's LoRA inputs take): the primary SafeTensor file of that version, else of
  the newest, listed by CivitAI's public API; a model that is not a LoRA (a checkpoint, an
  embedding) is refused before anything is downloaded. civitai.com stands for
  CIVITAI_ENDPOINT when that is set (a mirror or proxy); CIVITAI_TOKEN goes to it alone.

Tokens never go to the hosts these redirect their downloads to (the sites' file CDNs).
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qs, urlsplit

import httpx

from serve.adapters import AdapterInvalid
from serve.urls import host_allowed

_HUB, _CIVITAI = "https://huggingface.co", "https://civitai.com"
_REPO = re.compile(r"^[^/?#]+/[^/?#]+$")  # <owner>/<repo>
_CIVITAI_MODEL = re.compile(r"^/models/(?P<id>\d+)(?:/[^/]*)?$")
# Names LoRA trainers give their file, in order of preference (diffusers, ai-toolkit and
# Replicate's trainers, kohya).
_LORA_FILES = ("pytorch_lora_weights.safetensors", "lora.safetensors")
_LORA_TYPES = ("LORA", "LoCon", "DoRA")  # CivitAI's model types that are LoRA files


def _site(default: str, variable: str) -> str:
    return os.environ.get(variable, default).rstrip("/")


def _sites() -> dict[str, tuple[str, str]]:
    """Each site's address as named in URLs → (the address to use, its token variable)."""
    return {_HUB: (_site(_HUB, "HF_ENDPOINT"), "HF_TOKEN"),
            _CIVITAI: (_site(_CIVITAI, "CIVITAI_ENDPOINT"), "CIVITAI_TOKEN")}


def auth_headers(url: str) -> dict:
    """The site's token for a URL on Hugging Face's or CivitAI's endpoint; none elsewhere."""
    for endpoint, variable in _sites().values():
        token = os.environ.get(variable)
        if token and url.startswith(endpoint + "/"):
            return {"Authorization": f"Bearer {token}"}
    return {}


def file_url(client: httpx.Client, url: str, allowed_hosts: tuple[str, ...]) -> str:
    """The URL to download for the LoRA reference `url`: a page's file (looked up), a site
    URL moved onto its configured endpoint, anything else as it is. Raises
    AdapterInvalid."""
    for site, (endpoint, _) in _sites().items():
        if url != site and not url.startswith(site + "/"):
            continue
        parts = urlsplit(url)
        if site == _HUB and _REPO.match(parts.path.strip("/")) and not parts.query:
            return _repo_file(client, endpoint, parts.path.strip("/"), allowed_hosts)
        model = _CIVITAI_MODEL.match(parts.path) if site == _CIVITAI else None
        if model:
            version = parse_qs(parts.query).get("modelVersionId", [None])[0]
            return _civitai_file(client, endpoint, model["id"], version, allowed_hosts)
        return endpoint + url.removeprefix(site)
    return url


def _lookup(client: httpx.Client, api: str, allowed_hosts: tuple[str, ...], what: str):
    """The JSON answer of a site's API; AdapterInvalid for a refused host or a non-200."""
    if not host_allowed(api, allowed_hosts):
        raise AdapterInvalid(f"{urlsplit(api).hostname} is not in this server's "
                             "lora_allowed_hosts")
    response = client.get(api, headers=auth_headers(api))
    if response.status_code != 200:
        raise AdapterInvalid(f"looking up {what} gave HTTP {response.status_code}")
    try:
        return response.json()
    except ValueError:
        raise AdapterInvalid(f"the answer for {what} is not JSON") from None


def _repo_file(client: httpx.Client, hub: str, repo: str,
               allowed_hosts: tuple[str, ...]) -> str:
    """Hugging Face repository `repo`'s LoRA file: its only top-level .safetensors file,
    or among several the one named as trainers name LoRA files."""
    found = _lookup(client, f"{hub}/api/models/{repo}", allowed_hosts,
                    f"the Hugging Face repository {repo}")
    try:
        files = [s["rfilename"] for s in found["siblings"]]
    except (KeyError, TypeError):
        raise AdapterInvalid(f"Hugging Face's answer for {repo} lists no files") from None
    names = sorted(n for n in files if n.endswith(".safetensors") and "/" not in n)
    chosen = names if len(names) == 1 else [n for n in _LORA_FILES if n in names][:1]
    if not chosen:
        raise AdapterInvalid(f"the Hugging Face repository {repo} has "
                             f"{len(names)} top-level .safetensors files ({', '.join(names)}); "
                             f"give one: https://huggingface.co/{repo}/resolve/main/<file>")
    return f"{hub}/{repo}/resolve/main/{chosen[0]}"


def _civitai_file(client: httpx.Client, site: str, model_id: str, version: str | None,
                  allowed_hosts: tuple[str, ...]) -> str:
    """The download URL of CivitAI model `model_id`'s LoRA file, of `version` or the
    newest."""
    what = f"the CivitAI model {model_id}"
    if version is not None:
        found = _lookup(client, f"{site}/api/v1/model-versions/{version}", allowed_hosts,
                        f"{what}, version {version}")
        kind, files = (found.get("model") or {}).get("type"), found.get("files")
    else:
        found = _lookup(client, f"{site}/api/v1/models/{model_id}", allowed_hosts, what)
        newest = (found.get("modelVersions") or [{}])[0]
        kind, files = found.get("type"), newest.get("files")
    if kind not in _LORA_TYPES:
        raise AdapterInvalid(f"{what} is a {kind or 'model of unknown type'}, not a LoRA")
    usable = [f for f in files or [] if (f.get("metadata") or {}).get("format") == "SafeTensor"
              and f.get("downloadUrl")]
    if not usable:
        raise AdapterInvalid(f"{what} has no SafeTensor file to download")
    chosen = next((f for f in usable if f.get("primary")), usable[0])
    return chosen["downloadUrl"].replace(_CIVITAI, site, 1)
