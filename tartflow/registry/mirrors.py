"""Pull-through mirrors in front of a registry, the way fleets avoid egress limits.

``TARTFLOW_MIRRORS`` (or the flow parameter ``mirrors``) maps a registry host to an ordered list
of mirror base URLs with scheme: ``{"ghcr.io": ["http://mirror.lan:5000"]}``. Every manifest and
blob request goes to the mirrors in order, then to the registry itself; a miss (404) or any
error falls through to the next. Nothing is trusted more for coming from a mirror: digests and
sizes are verified exactly as for the registry, and the image lands in Tart's cache under its
own name. A mirror that failed at the network level is skipped for ``COOLDOWN`` seconds so a
dead one costs one connect timeout, not one per request.

Credentials: a mirror URL never carries any (``user:password@`` is refused before anything
runs, and the message says where they go instead). A mirror is asked with its own host's
credentials only: a Secret block entry or Docker config keyed by ``mirror-host[:port]``, or
``TART_REGISTRY_USERNAME``/``PASSWORD`` when ``TART_REGISTRY_HOSTNAME`` names that host. The
registry's credentials, and environment credentials meant for "every registry", never go to a
mirror: a plain-HTTP LAN cache that answers 401 would otherwise collect them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import replace
from typing import Protocol
from urllib.parse import urlsplit

from ..errors import RegistryError, TartflowError, UsageError
from .auth import CredentialLookup
from .client import BlobResponse, ClientSettings, ManifestResponse, RegistryClient, client_for

__all__ = ["COOLDOWN", "BlobSource", "MirroredSource", "mirror_host", "parse_mirrors", "source_for"]

COOLDOWN = 60.0
_down: dict[str, float] = {}  # mirror base URL -> monotonic time it may be tried again
_down_lock = threading.Lock()


class BlobSource(Protocol):
    """What a pull reads from: one registry, or a registry behind mirrors."""

    def get_manifest(self, repository: str, reference: str) -> ManifestResponse: ...

    def open_blob(self, repository: str, digest: str, offset: int = 0) -> AbstractContextManager[BlobResponse]: ...


def parse_mirrors(text: str | Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """Validate a mirror map (JSON text or a mapping); raise UsageError saying what is wrong."""
    if not text:
        return {}
    try:
        value = json.loads(text) if isinstance(text, str) else dict(text)
    except ValueError as exc:
        raise UsageError(f"TARTFLOW_MIRRORS is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError('mirrors must map a registry host to a list of URLs, e.g. {"ghcr.io": ["http://mirror:5000"]}')
    mirrors: dict[str, list[str]] = {}
    for host, urls in value.items():
        if not isinstance(host, str) or not isinstance(urls, list):
            raise UsageError(f"mirrors for {host!r} must be a list of URLs")
        for url in urls:
            _check_url(host, url)
        mirrors[host] = [url.rstrip("/") for url in urls]
    return mirrors


def _check_url(host: str, url: object) -> None:
    """A mirror base URL, else UsageError; a message never repeats userinfo (it is a secret)."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is not None:
            parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is not None and "@" in parts.netloc:
        bare = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
        where = mirror_host(bare)
        raise UsageError(
            f"mirror {bare} for {host} has credentials in its URL; remove them and give them by the mirror's "
            f"host instead: `docker login {where}` (Docker config) or a Prefect Secret block entry "
            f'{{"{where}": {{"username": ..., "password": ...}}}}'
        )
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise UsageError(f"mirror {url!r} for {host} must be a base URL with http:// or https://")


def mirror_host(url: str) -> str:
    """``host[:port]`` of a mirror base URL, as credentials are keyed (never any userinfo)."""
    return urlsplit(url).netloc.rsplit("@", 1)[-1]


def source_for(
    host: str, urls: Sequence[str] | None, settings: ClientSettings,
    lookup: CredentialLookup, mirror_lookup: CredentialLookup,
) -> BlobSource:
    """The registry ``host`` (with ``lookup``'s credentials), behind mirrors ``urls`` when any
    (each with ``mirror_lookup``'s credentials for its own host)."""
    registry = client_for(host, settings, lookup)
    if not urls:
        return registry
    mirrors = [(url, client_for(mirror_host(url), settings, mirror_lookup, base_url=url)) for url in urls]
    return MirroredSource(mirrors, registry)


class MirroredSource:
    """Mirrors in order, then the registry; the first that answers serves the request."""

    def __init__(self, mirrors: Sequence[tuple[str, RegistryClient]], registry: RegistryClient) -> None:
        self._mirrors = list(mirrors)
        self._registry = registry

    def _candidates(self) -> Iterator[tuple[str | None, RegistryClient]]:
        now = time.monotonic()
        for url, client in self._mirrors:
            with _down_lock:
                if _down.get(url, 0.0) > now:
                    continue
            yield url, client
        yield None, self._registry

    @staticmethod
    def _failed(url: str | None, exc: TartflowError) -> None:
        if url is not None and isinstance(exc, RegistryError) and exc.status is None:
            with _down_lock:
                _down[url] = time.monotonic() + COOLDOWN

    def get_manifest(self, repository: str, reference: str) -> ManifestResponse:
        for url, client in self._candidates():
            try:
                return client.get_manifest(repository, reference)
            except TartflowError as exc:
                if url is None:
                    raise
                self._failed(url, exc)
        raise AssertionError("unreachable: the registry is always the last candidate")

    @contextmanager
    def open_blob(self, repository: str, digest: str, offset: int = 0) -> Iterator[BlobResponse]:
        for url, client in self._candidates():
            stack = ExitStack()
            try:
                blob = stack.enter_context(client.open_blob(repository, digest, offset))
            except TartflowError as exc:
                if url is None:
                    raise
                self._failed(url, exc)
                continue
            with stack:
                try:
                    yield replace(blob, mirror=True) if url is not None else blob
                except TartflowError as exc:
                    self._failed(url, exc)
                    raise
            return
