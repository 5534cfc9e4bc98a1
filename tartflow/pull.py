"""The steps of a pull, each one function over small serialisable values (references, digests,
paths), so that Prefect tasks can be thin wrappers and a restarted flow can skip any of them.

1. ``resolve``: fetch the manifest (an index resolves to its darwin/arm64 manifest), validate
   it as a Tart VM, keep its bytes in the store, check space, prepare the staging VM.
2. ``fetch``: one blob, from a VM in Tart's cache that has it, else into the store
   (resumable, verified while streaming); a disk layer made of that blob alone is decoded
   into the staging ``disk.img`` on the way in.
3. ``verify``: make sure every disk layer of a blob is decoded and verified against its
   uncompressed size and content digest (decoding from the store what was not decoded on the
   way in), and place config/NVRAM; nothing unverified is ever assembled. A disk layer's
   blob is then dropped from the store (its decoded bytes are what is kept).
4. ``assemble``: move the staging VM into Tart's cache and point the tag at it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from . import credentials
from .errors import CorruptLayerError, ImageFormatError, InsufficientSpaceError, StoreError
from .fetch import FetchResult, fetch_blob, waiting_note
from .manifest import (
    DOCKER_LIST,
    OCI_INDEX,
    Descriptor,
    TartImage,
    media_type_of,
    parse_manifest,
    pick_from_index,
)
from .peer import fetch_from_peers, parse_peers
from .progress import reporter
from .reference import Reference, parse_reference
from .registry.client import ClientSettings, client_for
from .registry.mirrors import BlobSource, MirroredSource, parse_mirrors
from .registry.retry import RetryPolicy, retrying
from .reuse import reuse_local
from .staging import Staging
from .store import Store, translate_os_errors
from .tartcache import TartCache, tart_home

__all__ = [
    "PullSettings",
    "ResolvedImage",
    "assemble",
    "fetch",
    "resolve",
    "staged_evidence",
    "store_root",
    "verify",
]

#: Headroom kept free beyond what the pull needs, so the machine stays usable.
SPACE_MARGIN = 1024**3


def store_root(home: Path | None = None) -> Path:
    """``$TARTFLOW_HOME``, else ``$TART_HOME/tartflow`` (same file system as Tart's cache)."""
    env = os.environ.get("TARTFLOW_HOME")
    return Path(os.path.abspath(env)) if env else (home or tart_home()) / "tartflow"


@dataclass(frozen=True)
class PullSettings:
    """How to pull; serialisable so it can travel as a Prefect parameter.

    ``retry_for``: seconds to keep retrying temporary failures (egress limits last minutes).
    ``tart_home``/``store``: default from ``$TART_HOME`` and ``$TARTFLOW_HOME`` at run time.
    ``read_timeout``: seconds a stream may stay silent before it counts as stalled.
    """

    insecure: bool = False
    retry_for: float = 30 * 60
    read_timeout: float = 60.0
    tart_home: str | None = None
    store: str | None = None
    check_space: bool = True
    space_margin: float = SPACE_MARGIN
    mirrors: dict[str, list[str]] | None = None
    peers: list[str] | None = None  # peer endpoints asked for layers first (tartflow.peer)

    @classmethod
    def from_env(cls, **values: object) -> PullSettings:
        """Settings with ``read_timeout`` from ``$TARTFLOW_READ_TIMEOUT`` (seconds) and
        ``space_margin`` from ``$TARTFLOW_SPACE_MARGIN`` (bytes) when set."""
        for env, name in (("TARTFLOW_READ_TIMEOUT", "read_timeout"), ("TARTFLOW_SPACE_MARGIN", "space_margin")):
            if os.environ.get(env):
                values.setdefault(name, float(os.environ[env]))
        if not values.get("mirrors"):
            values["mirrors"] = parse_mirrors(os.environ.get("TARTFLOW_MIRRORS")) or None
        values["peers"] = parse_peers(values.get("peers") or os.environ.get("TARTFLOW_PEERS")) or None  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]

    def cache(self) -> TartCache:
        return TartCache(Path(self.tart_home) if self.tart_home else None)

    def open_store(self) -> Store:
        return Store(Path(self.store) if self.store else store_root(self.cache().home))

    def client(self, ref: Reference) -> BlobSource:
        """The registry of ``ref``, behind its mirrors when any are configured."""
        settings = ClientSettings(insecure=self.insecure, read_timeout=self.read_timeout)
        registry = client_for(ref.host, settings, credentials.lookup)
        urls = parse_mirrors(self.mirrors).get(ref.host)
        if not urls:
            return registry
        mirrors = [(url, client_for(urlsplit(url).netloc, settings, credentials.lookup, base_url=url)) for url in urls]
        return MirroredSource(mirrors, registry)

    def policy(self) -> RetryPolicy:
        return RetryPolicy(retry_for=self.retry_for)


@dataclass(frozen=True)
class ResolvedImage:
    reference: str  # as the user gave it, normalised (host/ns:tag or host/ns@digest)
    manifest_digest: str
    installed: bool  # the digest directory already holds this VM: no blob needs fetching
    blobs: list[str] = field(default_factory=list)  # digests still worth fetching
    compressed_size: int = 0
    disk_size: int = 0
    layers_pending: int = 0  # disk layers still to verify into the staging VM

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@translate_os_errors
def resolve(settings: PullSettings, reference: str) -> ResolvedImage:
    ref = parse_reference(reference)
    client, policy = settings.client(ref), settings.policy()
    got = retrying(lambda: client.get_manifest(ref.repository, ref.reference), policy)
    if media_type_of(got.raw, got.media_type) in (OCI_INDEX, DOCKER_LIST):
        chosen = pick_from_index(got.raw)
        got = retrying(lambda: client.get_manifest(ref.repository, chosen.digest), policy)
        if media_type_of(got.raw, got.media_type) in (OCI_INDEX, DOCKER_LIST):
            raise ImageFormatError(f"{ref}: an image index points to another index; not a Tart VM image")
    image = parse_manifest(got.raw, got.digest)
    store = settings.open_store()
    store.put_manifest(got.digest, got.raw)
    installed = _installed(settings, ref, got.digest)
    blobs: list[str] = []
    layers_pending = 0
    if not installed:
        staging = Staging(store, image)
        blobs = [d.digest for d in image.blobs if not staging.is_verified(d.digest)]
        layers_pending = sum(1 for i in range(len(image.disk_layers)) if not staging.layer_done(i))
        if settings.check_space:
            _check_space(store, staging, image, blobs, settings.space_margin)
        staging.prepare(got.raw)
    return ResolvedImage(str(ref), got.digest, installed, blobs, image.compressed_size, image.disk_size,
                         layers_pending)


def load_image(settings: PullSettings, manifest_digest: str) -> tuple[Store, TartImage]:
    store = settings.open_store()
    return store, parse_manifest(store.read_manifest(manifest_digest), manifest_digest)


def _installed(settings: PullSettings, ref: Reference, manifest_digest: str) -> bool:
    """True once any pull (another process, another flow run) has installed this VM: the
    remaining steps have nothing left to do, and its blobs may already be gone."""
    cache = settings.cache()
    return cache.is_vm(cache.digest_dir(ref, manifest_digest))


@translate_os_errors
def fetch(
    settings: PullSettings, reference: str, manifest_digest: str, digest: str,
    gate: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> FetchResult:
    """Obtain blob ``digest``: from the store, from a VM in Tart's cache, or over the network.

    ``gate`` is entered around network transfers only (a fleet-wide egress limit, say).
    """
    store, image = load_image(settings, manifest_digest)
    desc = next(d for d in image.blobs if d.digest == digest)
    ref = parse_reference(reference)
    try:
        if not _installed(settings, ref, manifest_digest):
            return _fetch(settings, ref, store, image, desc, gate)
    except StoreError:
        # Another pull of this image installed it meanwhile, taking the staging VM with it.
        if not _installed(settings, ref, manifest_digest):
            raise
    return _done_elsewhere(desc)


def _done_elsewhere(desc: Descriptor) -> FetchResult:
    """Nothing to fetch: another pull installed the VM or verified the blob into staging."""
    reporter().skip(desc.size)
    return FetchResult(desc.digest, desc.size, "", 0, desc.size, 0.0, verified=True)


def _fetch(
    settings: PullSettings, ref: Reference, store: Store, image: TartImage, desc: Descriptor,
    gate: Callable[[], AbstractContextManager[object]],
) -> FetchResult:
    digest = desc.digest
    stored = store.has_blob(digest, desc.size)
    if not stored and store.wait_for_ingest(digest, on_wait=lambda holder: waiting_note(desc, holder)):
        # A pull of another image sharing this blob is fetching it; it keeps no compressed
        # bytes when it decodes them on the way in, but its verified layer can be copied.
        stored = store.has_blob(digest, desc.size)
    if not stored and reuse_local(settings.cache(), Staging(store, image), digest):
        reporter().skip(desc.size)
        return FetchResult(digest, desc.size, "", 0, 0, 0.0, reused=desc.size, verified=True)
    # --- peers (issue 16): layers from other runners, verified against this manifest ---
    if not stored and settings.peers:
        started = time.monotonic()
        got = fetch_from_peers(settings.peers, Staging(store, image), desc, read_timeout=settings.read_timeout)
        if got is not None:
            return FetchResult(digest, desc.size, "", 0, 0, time.monotonic() - started, verified=True, peer=got.wire)
    # --- end peers ---
    client, policy = settings.client(ref), settings.policy()
    if stored:
        return fetch_blob(store, client, ref.repository, desc, policy)
    # A disk layer made of this blob alone is decoded as it downloads; a blob several layers
    # share (identical chunks) is decoded from the store by verify, once per layer.
    layers = [i for i, layer in enumerate(image.disk_layers) if layer.blob.digest == digest]
    with gate():
        if len(layers) != 1:
            return fetch_blob(store, client, ref.repository, desc, policy)
        with Staging(store, image).decoding(layers[0]) as fill:
            if fill is None:  # another pull of this image verified the layer meanwhile
                return _done_elsewhere(desc)

            def wanted_elsewhere() -> bool:  # a pull of another image that shares this layer
                return digest in store.staged_blobs(besides=image.manifest_digest)

            return fetch_blob(store, client, ref.repository, desc, policy, fill, keep=wanted_elsewhere)


@translate_os_errors
def verify(settings: PullSettings, reference: str, manifest_digest: str, digest: str) -> int:
    """Decode (disk) or place (config, NVRAM) blob ``digest`` in the staging VM, verified.

    Returns the number of decoded bytes written by this call (0 when already done).
    """
    if _installed(settings, parse_reference(reference), manifest_digest):
        return 0
    store, image = load_image(settings, manifest_digest)
    staging = Staging(store, image)
    if staging.is_verified(digest):  # taken from Tart's cache, or done by an earlier run
        return 0
    blob = store.blob_path(digest)
    written = 0
    for name, desc in (("config.json", image.config), ("nvram.bin", image.nvram)):
        if desc.digest == digest:
            staging.place(name, desc, blob.read_bytes())
    try:
        for index, layer in enumerate(image.disk_layers):
            if layer.blob.digest == digest and staging.decode(index, blob):
                written += layer.uncompressed_size
    except StoreError:
        if _installed(settings, parse_reference(reference), manifest_digest):
            return written  # another pull installed this VM meanwhile: nothing left to do here
        raise
    except CorruptLayerError as exc:
        # Its compressed digest matched the manifest, so fetching again would bring the same
        # bytes: the image itself is broken. Drop the blob so nothing unverified lingers.
        blob.unlink(missing_ok=True)
        raise CorruptLayerError(f"{exc.message}; the image in the registry is corrupt: re-push it") from None
    if any(layer.blob.digest == digest for layer in image.disk_layers) and staging.is_verified(digest):
        _release_blobs(store, image, [digest])
    return written


@translate_os_errors
def assemble(settings: PullSettings, reference: str, manifest_digest: str) -> str:
    """Install the verified VM into Tart's cache; returns its digest directory."""
    ref = parse_reference(reference)
    cache = settings.cache()
    target = cache.digest_dir(ref, manifest_digest)
    if cache.is_vm(target):
        return str(cache.install(ref, manifest_digest))
    store, image = load_image(settings, manifest_digest)
    staging = Staging(store, image)
    with staging.locked():
        if not cache.is_vm(target):
            staging.check_complete()
            staging.sync()
            cache.install(ref, manifest_digest, staging.dir)
        else:
            cache.install(ref, manifest_digest)
    staging.discard_state()
    _release_blobs(store, image)
    return str(target)


def staged_evidence(settings: PullSettings, manifest_digest: str, digest: str) -> list[Path] | None:
    """The files proving ``digest`` is verified into the staging VM, or None if it is not."""
    store, image = load_image(settings, manifest_digest)
    staging = Staging(store, image)
    return staging.evidence(digest) if staging.is_verified(digest) else None


def _check_space(store: Store, staging: Staging, image: TartImage, pending: list[str], margin: float) -> None:
    """Refuse before fetching when the decoded disk plus missing blobs cannot fit."""
    sizes = {d.digest: d.size for d in image.blobs}
    compressed = sum(sizes[d] for d in pending if not store.has_blob(d, sizes[d]))
    decoded = sum(d.uncompressed_size for i, d in enumerate(image.disk_layers) if not staging.layer_done(i))
    needed = compressed + decoded
    free = shutil.disk_usage(store.root).free
    if needed + margin > free:
        raise InsufficientSpaceError(
            f"not enough disk space at {store.root}: the pull needs {needed / 1e9:.2f} GB more "
            f"(+{margin / 1e9:.2f} GB margin), {free / 1e9:.2f} GB is free; free some space "
            "(tart prune, tartflow gc) and run the same command again"
        )


def _release_blobs(store: Store, image: TartImage, digests: list[str] | None = None) -> None:
    """Drop compressed blobs of this image (all, or ``digests``) whose decoded form is kept,
    unless another staging VM (a pull in progress) still lists them."""
    wanted = store.staged_blobs(besides=image.manifest_digest)
    for digest in digests if digests is not None else [d.digest for d in image.blobs]:
        if digest not in wanted and not store.ingest_is_locked(digest):
            store.blob_path(digest).unlink(missing_ok=True)
