"""Asking peers for what a pull needs, before mirrors and the registry.

The manifest never comes from a peer: it came from the registry or a mirror, and it names what
every byte must hash to. A disk layer is asked for by its uncompressed-content digest and its
decoded bytes go straight into the staging ``disk.img`` through the same sparse, verifying
writer a local copy uses; the layer counts as done only if size and digest match. Config and
NVRAM are checked against their digest before they are placed. So a peer can waste time but can
never put a byte into a VM.

Failure is normal here and never fatal: a peer that answers 404, refuses the token, cannot be
reached, stalls past the read timeout, or sends bytes that do not parse or do not verify is
skipped for that layer (and, unless it merely lacked the layer, for ``COOLDOWN`` seconds), and
the next peer, then the mirrors and the registry, are asked. A cut answer is resumed with a
``Range`` request from where the bytes stopped, from the same peer while it makes progress, or
from the next one (the bytes are the same by digest wherever they come from). A layer the
receiver was killed in the middle of starts over: it is at most one chunk (512 MiB) on a LAN.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlsplit

import httpx

from .. import cancel
from ..disk import LayerWriter
from ..errors import CorruptLayerError, UsageError
from ..manifest import Descriptor, DiskLayer
from ..progress import reporter
from ..staging import Staging
from .token import ENV, current_token
from .wire import ZERO_RUNS, WireError, ZeroRunDecoder

__all__ = ["COOLDOWN", "PeerFetch", "fetch_from_peers", "parse_peers"]

COOLDOWN = 60.0
#: Attempts at one peer for one layer, each resuming where the last stopped; only an attempt
#: that made progress earns another.
ATTEMPTS = 4
_ZERO_BLOCK = bytes(1024 * 1024)
_down: dict[str, float] = {}  # peer URL -> monotonic time it may be asked again
_down_lock = threading.Lock()
_warned_no_token = False


@dataclass(frozen=True)
class PeerFetch:
    """What peers provided for one blob: decoded content bytes, and bytes on the wire."""

    content: int
    wire: int


class _Skip(Exception):
    """This peer cannot help with this layer; ``down`` if it should rest for a while."""

    def __init__(self, reason: str, down: bool = True) -> None:
        super().__init__(reason)
        self.down = down


def parse_peers(value: str | Sequence[str] | None) -> list[str]:
    """A JSON list of peer base URLs (``$TARTFLOW_PEERS``) or a list; UsageError if malformed."""
    if not value:
        return []
    try:
        urls = json.loads(value) if isinstance(value, str) else list(value)
    except ValueError as exc:
        raise UsageError(f"TARTFLOW_PEERS is not valid JSON: {exc}") from None
    if not isinstance(urls, list):
        raise UsageError('peers must be a JSON list of URLs, e.g. ["http://runner-2.lan:8377"]')
    for url in urls:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise UsageError(f"peer {url!r} must be a base URL with http:// or https://")
    return [url.rstrip("/") for url in urls]


def fetch_from_peers(
    peers: Sequence[str], staging: Staging, desc: Descriptor, *, read_timeout: float, token: str | None = None,
) -> PeerFetch | None:
    """Fill everything blob ``desc`` provides in ``staging`` from peers; None unless all of it
    is now verified there (what is done stays done; the caller fetches the rest upstream)."""
    token = token or current_token()
    if not token:
        _warn_no_token()
        return None
    session = _Session(token, read_timeout)
    try:
        image = staging.image
        for name, small in (("config.json", image.config), ("nvram.bin", image.nvram)):
            if small.digest == desc.digest and not staging.is_verified(desc.digest):
                data = session.small_blob(peers, small)
                if data is not None:
                    staging.place(name, small, data)
        for index, layer in enumerate(image.disk_layers):
            if layer.blob.digest == desc.digest and not staging.layer_done(index):
                session.layer(peers, staging, index, layer)
    finally:
        session.close()
    if not staging.is_verified(desc.digest):
        return None
    reporter().skip(desc.size)
    return PeerFetch(session.content, session.wire)


def _warn_no_token() -> None:
    global _warned_no_token
    if not _warned_no_token:
        _warned_no_token = True
        reporter().note(f"peers are configured but {ENV} is not set; asking the registry instead")


def _available(peers: Sequence[str]) -> list[str]:
    now = time.monotonic()
    with _down_lock:
        return [url for url in peers if _down.get(url, 0.0) <= now]


def _rest(url: str) -> None:
    with _down_lock:
        _down[url] = time.monotonic() + COOLDOWN


class _Session:
    def __init__(self, token: str, read_timeout: float) -> None:
        self._client = httpx.Client(
            timeout=httpx.Timeout(read_timeout, connect=min(5.0, read_timeout)),
            headers={"Authorization": f"Bearer {token}", "Accept": ZERO_RUNS},
            trust_env=False, follow_redirects=False,
        )
        self.content = self.wire = 0

    def close(self) -> None:
        self._client.close()

    def small_blob(self, peers: Sequence[str], desc: Descriptor) -> bytes | None:
        for url in _available(peers):
            try:
                with self._client.stream("GET", f"{url}/v1/blobs/{desc.digest}",
                                         headers={"Accept": "application/octet-stream"}) as response:
                    if response.status_code != 200:
                        _check_status(response)
                    data = b""
                    for chunk in response.iter_bytes():
                        data += chunk
                        if len(data) > desc.size:
                            break
                self.wire += len(data)
            except httpx.HTTPError:
                _rest(url)
                continue
            except _Skip as skip:
                if skip.down:
                    _rest(url)
                continue
            if len(data) == desc.size and "sha256:" + hashlib.sha256(data).hexdigest() == desc.digest:
                self.content += len(data)
                return data
            _rest(url)
            reporter().note(f"peer {url} sent a blob {desc.digest[:19]} that does not verify; skipping it")
        return None

    def layer(self, peers: Sequence[str], staging: Staging, index: int, layer: DiskLayer) -> None:
        """Peers in turn until one fills the layer verified; each that fails is left out."""
        left = _available(peers)
        while left:
            used: list[str] = []
            try:
                if staging.fill(index, partial(self._write, left, used, layer)):  # False: done elsewhere
                    self.content += layer.uncompressed_size
                return
            except CorruptLayerError as exc:
                for url in used:
                    _rest(url)
                reporter().note(f"bytes from peer(s) {', '.join(used)} do not verify ({exc}); skipping them")
            except _Skip:
                return

    def _write(self, left: list[str], used: list[str], layer: DiskLayer, fd: int, dirty: bool) -> None:
        """Fill the layer at ``fd`` from the peers in ``left``, each moved to ``used`` once asked:
        one that stops early hands over to the next at the same offset. Raises unless the bytes
        written are the layer, verified."""
        writer = LayerWriter(layer, fd, dirty, f"layer {layer.uncompressed_digest[:19]} from peers")
        while left:
            url = left.pop(0)
            used.append(url)
            if self._from(url, layer, writer):
                writer.verify()  # size and content digest: raises CorruptLayerError
                return
        raise _Skip("no peer has it")

    def _from(self, url: str, layer: DiskLayer, writer: LayerWriter) -> bool:
        """Stream the rest of ``layer`` from ``url`` into ``writer``; True once every byte came."""
        total = layer.uncompressed_size
        for _ in range(ATTEMPTS):
            start = writer.position - layer.offset
            try:
                self._stream(url, layer, writer, start)
            except _Skip as skip:
                if skip.down:
                    _rest(url)
                return False
            except httpx.TimeoutException:  # stalled: it would stall again
                _rest(url)
                reporter().note(f"peer {url} stalled; asking elsewhere")
                return False
            except (httpx.HTTPError, WireError) as exc:
                if writer.position - layer.offset == start:  # no progress: give up on it
                    _rest(url)
                    reporter().note(f"peer {url} failed ({type(exc).__name__}); asking elsewhere")
                    return False
            if writer.position - layer.offset == total:
                return True
        return False

    def _stream(self, url: str, layer: DiskLayer, writer: LayerWriter, start: int) -> None:
        digest = layer.uncompressed_digest
        with self._client.stream("GET", f"{url}/v1/layers/{digest}", headers={"Range": f"bytes={start}-"}) as response:
            if response.status_code != 206:
                _check_status(response)
            expected = f"bytes {start}-{layer.uncompressed_size - 1}/{layer.uncompressed_size}"
            if response.headers.get("content-range") != expected or response.headers.get("content-type") != ZERO_RUNS:
                raise _Skip("answer is not the range asked for")
            decoder = ZeroRunDecoder()
            for chunk in response.iter_raw():
                self.wire += len(chunk)
                for piece in decoder.feed(chunk):
                    _write(writer, piece)
                cancel.check()
            decoder.finish()


def _check_status(response: httpx.Response) -> None:
    """Any answer but the one asked for: 404 means only this layer, anything else the peer."""
    raise _Skip(f"HTTP {response.status_code}", down=response.status_code != 404)


def _write(writer: LayerWriter, piece: memoryview | int) -> None:
    if isinstance(piece, int):
        while piece > 0:
            block = memoryview(_ZERO_BLOCK)[:min(piece, len(_ZERO_BLOCK))]
            writer.write(block)
            piece -= block.nbytes
    else:
        writer.write(piece)
