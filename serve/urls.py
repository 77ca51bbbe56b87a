"""Which URLs the server may reach on a request's behalf: only hosts the operator listed."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import SplitResult, urlsplit

import httpx

from serve.errors import InvalidField


def outbound_client() -> httpx.AsyncClient:
    """The client for the calls made on requests' behalf (webhooks, input image URLs).
    Redirects are never followed. Connections are not capped: each belongs to a request
    or a prediction's webhook delivery, both bounded on their own, and with a cap, one
    receiver that hangs (a delivery holds its connection for up to four 10 s attempts)
    would hold every other delivery and image fetch waiting for a free connection."""
    return httpx.AsyncClient(follow_redirects=False,
                             limits=httpx.Limits(max_connections=None))


def host_allowed(url: str, allowed_hosts: Iterable[str]) -> bool:
    """Whether `url` is http(s) to a listed host, host:port, or a subdomain of a listed
    `*.domain`.

    Nothing is resolved: a host is allowed only if it is named, so a request cannot make
    the server reach an address the operator did not name.
    """
    parts = _parts(url)
    if parts is None:
        return False
    host = parts.hostname.lower()
    for entry in (h.lower() for h in allowed_hosts):
        if entry.startswith("*."):
            if host.endswith(entry[1:]):
                return True
        elif entry in (host, f"{host}:{parts.port}"):
            return True
    return False


def _parts(url: str) -> SplitResult | None:
    """The parts of an http(s) URL with a host and a valid port; None for anything else."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError when out of range)
    except ValueError:  # malformed: an unclosed IPv6 bracket, a port past 65535
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts


def check_allowed_url(url: str, allowed_hosts: Iterable[str], field: str, setting: str) -> None:
    """Raise InvalidField(field) unless `url` is http(s) to a host allowed by the config's
    `setting` (see `host_allowed`)."""
    parts = _parts(url)
    if parts is None:
        raise InvalidField(field, "must be an http(s) URL")
    if not host_allowed(url, allowed_hosts):
        raise InvalidField(field, f"host {parts.hostname.lower()} is not in this server's "
                                  f"{setting}")
