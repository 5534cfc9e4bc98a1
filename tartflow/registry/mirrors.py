"""Pull-through mirrors in front of a registry, the way fleets avoid egress limits.

``TARTFLOW_MIRRORS`` (or the flow parameter ``mirrors``) maps a registry host to an ordered list
of mirror base URLs with scheme: ``{"ghcr.io": ["http://mirror.lan:5000"]}``. Every manifest and
blob request goes to the mirrors in order, then to the registry itself; a miss (404) or any
error falls through to the next. Nothing is trusted more for coming from a mirror: digests and
sizes are verified exactly as for the registry, and the image lands in Tart's cache under its
own name. A mirror that failed at the network level is skipped for ``COOLDOWN`` seconds so a
dead one costs one connect timeout, not one per request.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Protocol
from urllib.parse import urlsplit

from ..errors import RegistryError, TartflowError, UsageError
from .client import BlobResponse, ManifestResponse, RegistryClient

__all__ = ["COOLDOWN", "BlobSource", "MirroredSource", "parse_mirrors"]

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
            parts = urlsplit(url) if isinstance(url, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
                raise UsageError(f"mirror {url!r} for {host} must be a base URL with http:// or https://")
        mirrors[host] = [url.rstrip("/") for url in urls]
    return mirrors


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
                    yield blob
                except TartflowError as exc:
                    self._failed(url, exc)
                    raise
            return
