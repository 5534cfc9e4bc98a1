"""One registry, its two resources: manifests and blobs.

API: https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pull . Blob GETs may
be redirected to a CDN with a signed, expiring URL (ghcr.io does); the redirect is followed by
hand, without the registry's Authorization header, and every new attempt asks the registry for
a fresh one. Status is checked explicitly: a 200 answer to a ranged GET means the server ignored
the range, and the caller is told to start over rather than append at the wrong offset.

Waits: every socket wait is sliced (``waits``), so Ctrl+C ends it within a second; a manifest
(and a token, see ``auth``) must arrive whole within ``ClientSettings.exchange_deadline``, so a
server trickling one byte a second cannot hold a pull. A redirect from https to http is refused
unless ``insecure``: the signed URL it carries would travel in clear.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpcore
import httpx
import truststore

from ..errors import DigestMismatchError, ImageFormatError, RegistryError
from ..manifest import MANIFEST_ACCEPT, MAX_MANIFEST_SIZE
from ..reference import validate_digest
from . import waits
from .auth import CredentialLookup, RegistryAuth
from .errors import error_from_response, error_from_transport, redact

__all__ = ["BlobResponse", "ClientSettings", "ManifestResponse", "RegistryClient", "client_for"]

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

# httpcore reads the socket 64 KiB at a time, and each read costs a round of Python (h11
# event, write, hash, progress) holding the GIL. 1 MiB reads moved one 256 MB blob at 649
# instead of 432 MB/s with 30% less CPU here. httpx has no setting for it, so the class
# attribute is raised once, when the first client is made (only ever upwards, only if it still
# exists), so importing tartflow patches nothing.
_READ_SIZE = 1024 * 1024
_MAX_REDIRECTS = 5


@functools.cache
def _raise_read_size() -> None:
    http11 = getattr(getattr(httpcore, "_sync", None), "http11", None)
    if http11 is not None and getattr(http11.HTTP11Connection, "READ_NUM_BYTES", _READ_SIZE) < _READ_SIZE:
        http11.HTTP11Connection.READ_NUM_BYTES = _READ_SIZE


@dataclass(frozen=True)
class ClientSettings:
    """Transport settings; defaults suit a 50 GB pull over a flaky link.

    ``read_timeout`` is how long a stream may stay silent before it counts as stalled.
    """

    insecure: bool = False
    connect_timeout: float = 15.0
    read_timeout: float = 60.0

    @property
    def exchange_deadline(self) -> float:
        """Seconds a small exchange (manifest, token, error body) may take in all: a connect
        and two stalls' worth, however the bytes trickle in."""
        return self.connect_timeout + 2 * self.read_timeout


@dataclass(frozen=True)
class ManifestResponse:
    raw: bytes
    media_type: str
    digest: str


@dataclass
class BlobResponse:
    """An open blob stream; ``start`` is the offset its first byte belongs at; ``mirror`` says
    a pull-through mirror answered rather than the registry (reports count bytes per source)."""

    start: int
    total: int | None
    _response: httpx.Response | None
    _what: str
    _read_timeout: float | None = None
    mirror: bool = False

    def iter_bytes(self) -> Iterator[bytes]:
        """Each network read as it arrives (no chunk size: httpx would buffer up to it, and a
        cut stream would lose the buffered bytes)."""
        if self._response is None:
            return
        try:
            yield from self._iter()
        except httpx.TransportError as exc:
            raise error_from_transport(exc, what=self._what) from None
        except (httpcore.TimeoutException, httpcore.NetworkError) as exc:
            kind = httpx.ReadTimeout if isinstance(exc, httpcore.TimeoutException) else httpx.ReadError
            raise error_from_transport(kind(str(exc), request=self._response.request), what=self._what) from None

    def _iter(self) -> Iterator[bytes]:
        """A body of known length is read straight from the connection's network stream (the
        ``network_stream`` response extension) after the first read, which h11 hands over
        with everything it had buffered behind the headers. h11 copies each received byte
        four times holding the GIL (buffer append, two slices, bytes()); this reads it once.
        The connection is then closed rather than reused, as h11 never saw the body end."""
        response = self._response
        assert response is not None
        raw = response.iter_raw()
        stream = response.extensions.get("network_stream")
        length = response.headers.get("content-length", "")
        plain = "transfer-encoding" not in response.headers and "content-encoding" not in response.headers
        if stream is None or not length.isdigit() or not plain:
            yield from raw
            return
        left = int(length)
        for chunk in raw:  # the first read, through h11
            left -= len(chunk)
            yield chunk
            break
        while left > 0:
            data = stream.read(min(left, _READ_SIZE), timeout=self._read_timeout)
            if not data:
                return  # cut short: the caller sees fewer bytes than the length and retries
            left -= len(data)
            yield data


class RegistryClient:
    """Talks to one registry host; thread-safe, one connection pool, one token cache."""

    def __init__(
        self,
        host: str,
        *,
        settings: ClientSettings | None = None,
        credentials: CredentialLookup | None = None,
        base_url: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network, for tests of corners no real registry produces."""
        _raise_read_size()
        self.host = host
        self.settings = settings or ClientSettings()
        scheme = "http" if self.settings.insecure else "https"
        self.base_url = (base_url or f"{scheme}://{host}").rstrip("/")
        timeout = httpx.Timeout(self.settings.read_timeout, connect=self.settings.connect_timeout)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        verify = tls_context()

        def client(**extra: object) -> httpx.Client:
            sliced = transport or waits.transport(verify=verify, limits=limits)
            return httpx.Client(timeout=timeout, limits=limits, follow_redirects=False, verify=verify,
                                transport=sliced, **extra)  # type: ignore[arg-type]

        # Token requests go through a client of their own (same timeouts, no auth), so their
        # bodies can be capped and their realm checked before anything is sent.
        self._tokens = client()
        auth = RegistryAuth(host, credentials or (lambda _host: None), origin=self.base_url, tokens=self._tokens,
                            insecure=self.settings.insecure, deadline=self.settings.exchange_deadline)
        self._http = client(auth=auth)
        # Redirect targets (CDNs) get no registry credentials.
        self._cdn = client()

    def close(self) -> None:
        self._http.close()
        self._cdn.close()
        self._tokens.close()

    def call(
        self, method: str, url: str, *, what: str, expect: tuple[int, ...], **kwargs: object
    ) -> httpx.Response:
        """One request to the registry (a path or an absolute URL it handed out), its body read,
        errors translated; any status outside ``expect`` raises RegistryError."""
        target = url if url.startswith(("http://", "https://")) else f"{self.base_url}{url}"
        try:
            response = self._http.request(method, target, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            raise error_from_transport(exc, what=what) from None
        if response.status_code not in expect:
            raise error_from_response(response, response.content[:65536], what=what)
        return response

    def get_manifest(self, repository: str, reference: str) -> ManifestResponse:
        """The manifest's bytes exactly as sent, capped at MAX_MANIFEST_SIZE, and their digest."""
        url = f"{self.base_url}/v2/{repository}/manifests/{reference}"
        what = f"manifest {self.host}/{repository}:{reference}" if not reference.startswith("sha256:") \
            else f"manifest {self.host}/{repository}@{reference}"
        try:
            with waits.exchange(self.settings.exchange_deadline), \
                    self._http.stream("GET", url, headers={"Accept": MANIFEST_ACCEPT}) as response:
                if response.status_code != 200:
                    raise error_from_response(response, _read_capped(response, 65536), what=what)
                raw = _read_capped(response, MAX_MANIFEST_SIZE + 1)
        except httpx.TransportError as exc:
            raise error_from_transport(exc, what=what) from None
        if len(raw) > MAX_MANIFEST_SIZE:
            raise ImageFormatError(f"{what} is larger than the {MAX_MANIFEST_SIZE}-byte cap; refusing it")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise DigestMismatchError(f"{what}: registry sent a manifest whose digest is {digest}")
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        return ManifestResponse(raw, media_type, digest)

    @contextmanager
    def open_blob(self, repository: str, digest: str, offset: int = 0) -> Iterator[BlobResponse]:
        """Open a blob stream from ``offset`` (a Range request when > 0).

        The yielded ``start`` is 0 when the server ignored the range: the caller must start over.
        """
        validate_digest(digest)
        what = f"blob {digest[:19]} of {self.host}/{repository}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        url = f"{self.base_url}/v2/{repository}/blobs/{digest}"
        client, from_cdn = self._http, False
        try:
            for _ in range(_MAX_REDIRECTS + 1):
                request = client.build_request("GET", url, headers=headers)
                response = client.send(request, stream=True)
                if response.status_code in (301, 302, 303, 307, 308):
                    location = response.headers.get("location", "")
                    response.close()
                    url = _redirect_target(response, location, what, self.settings.insecure)
                    client, from_cdn = self._cdn, True
                    continue
                try:
                    yield self._blob_response(response, offset, what, from_cdn)
                finally:
                    response.close()
                return
        except httpx.TransportError as exc:
            raise error_from_transport(exc, what=what) from None
        raise RegistryError(f"{what}: too many redirects", temporary=True)

    def _blob_response(self, response: httpx.Response, offset: int, what: str, from_cdn: bool) -> BlobResponse:
        status = response.status_code
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
            if not match or int(match.group(1)) != offset:
                raise RegistryError(f"{what}: server answered a range request with the wrong range", temporary=True)
            total = None if match.group(3) == "*" else int(match.group(3))
            return BlobResponse(offset, total, response, what, self.settings.read_timeout)
        if status == 200:
            length = response.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
            return BlobResponse(0, total, response, what, self.settings.read_timeout)
        if status == 416 and offset:
            # Our partial already holds every byte (or more): the caller verifies or restarts.
            return BlobResponse(offset, offset, None, what)
        with waits.exchange(self.settings.exchange_deadline):
            body = _read_capped(response, 65536)
        raise error_from_response(response, body, what=what, from_cdn=from_cdn)


def _redirect_target(response: httpx.Response, location: str, what: str, insecure: bool) -> str:
    if not location:
        raise RegistryError(f"{what}: redirect without a Location header", temporary=True)
    try:
        target = response.request.url.join(location)
    except httpx.InvalidURL:
        raise RegistryError(f"{what}: refusing a redirect to a malformed URL") from None
    if target.scheme not in ("http", "https"):
        raise RegistryError(f"{what}: refusing redirect to {redact(target)} (not http or https)")
    if response.request.url.scheme == "https" and target.scheme == "http" and not insecure:
        raise RegistryError(f"{what}: refusing a redirect from https to plain-http {redact(target)} "
                            "(the signed URL would travel in clear); use --insecure only on a trusted network")
    return str(target)


def _read_capped(response: httpx.Response, cap: int) -> bytes:
    data = bytearray()
    for chunk in response.iter_raw(65536):
        data += chunk
        if len(data) >= cap:
            break
    return bytes(data[:cap])


def tls_context() -> ssl.SSLContext:
    """TLS is always verified: against ``$SSL_CERT_FILE``/``$SSL_CERT_DIR`` when set, else the
    system trust store (macOS Keychain, where fleets install their corporate CAs) via truststore."""
    cafile, capath = os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile or None, capath=capath or None)
    return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


_clients: dict[tuple[str, ClientSettings, str | None], RegistryClient] = {}
_clients_lock = threading.Lock()


def client_for(
    host: str, settings: ClientSettings, credentials: CredentialLookup | None = None, base_url: str | None = None
) -> RegistryClient:
    """A process-wide client per (host, settings, base URL): tasks in one process share
    connections and tokens."""
    key = (host, settings, base_url)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = RegistryClient(host, settings=settings, credentials=credentials, base_url=base_url)
        return client
