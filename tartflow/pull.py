"""The steps of a pull, each one function of a ``PullContext`` (context.py) and small
serialisable values (references, digests, paths), so that Prefect tasks can be thin wrappers
and a restarted flow can skip any of them.

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

``outputs`` answers whether what steps 2 and 3 made for a blob is still on disk (a flow asks
before it lets an earlier run's result of theirs count).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from . import cowbase, intact, prune
from .context import Landing, PullContext, PullSettings, store_root
from .current import resolve_manifest
from .errors import CorruptLayerError, DigestMismatchError, InsufficientSpaceError, StoreError
from .fetch import FetchResult, fetch_blob, waiting_note
from .manifest import (
    Descriptor,
    TartImage,
    parse_manifest,
)
from .peer import fetch_from_peers
from .progress import reporter
from .reference import Reference, parse_reference
from .reuse import reuse_local
from .staging import Staging, staged_blobs
from .store import Store, translate_os_errors

__all__ = [
    "Landing",
    "Outputs",
    "PullContext",
    "PullSettings",
    "ResolvedImage",
    "assemble",
    "fetch",
    "outputs",
    "resolve",
    "store_root",
    "verify",
]


@dataclass(frozen=True)
class ResolvedImage:
    """What ``resolve`` found; small and serialisable (a Prefect task result, as itself)."""

    reference: str  # as the user gave it, normalised (host/ns:tag or host/ns@digest)
    manifest_digest: str
    installed: bool  # the digest directory already holds this VM: no blob needs fetching
    # Every blob of the VM (config, disk layers, NVRAM) in manifest order, empty when installed:
    # the flow submits each, so what an earlier run finished comes back from Prefect's cache.
    blobs: list[str] = field(default_factory=list)
    compressed_size: int = 0
    disk_size: int = 0
    layers_pending: int = 0  # disk layers still to verify into the staging VM
    cloned: int = 0  # decoded bytes the staging disk took from a copy-on-write clone (cowbase.py)
    clone_base: str = ""  # the cached VM it was cloned from
    cloned_blobs: list[str] = field(default_factory=list)  # blobs of those layers (cowbase.refresh_report)


@translate_os_errors
def resolve(ctx: PullContext, reference: str) -> ResolvedImage:
    ref = parse_reference(reference)
    raw, manifest_digest = resolve_manifest(ctx, ref)
    image = parse_manifest(raw, manifest_digest)
    ctx.store.put_manifest(manifest_digest, raw)
    installed = _installed(ctx, ref, manifest_digest)
    blobs: list[str] = []
    layers_pending = 0
    clone = cowbase.CloneSummary("", 0)
    if not installed:
        _say_why_not_current(ctx, ref, manifest_digest)
        staging = Staging(ctx.store, image)
        # Prepared first: a disk that starts as a clone of a trusted base already has those
        # layers done, so they are neither fetched nor counted as space needed (cowbase.py).
        fresh = not staging.dir.exists()
        staging.prepare(raw, ctx.cache)
        clone = cowbase.clone_summary(staging)
        blobs = [d.digest for d in image.blobs]
        pending = [d for d in blobs if not staging.is_verified(d)]
        layers_pending = sum(1 for i in range(len(image.disk_layers)) if not staging.layer_done(i))
        if ctx.settings.check_space:  # Tart-style auto-prune (prune.py)
            needed = prune.pull_peak(ctx.store, staging, image, pending, ctx.settings.concurrency)
            try:
                prune.make_room(ctx.cache, ctx.store, staging, ref, needed, ctx.settings.space_margin)
            except InsufficientSpaceError:
                if fresh:  # nothing was downloaded into it: a refusal leaves no staging VM behind
                    staging.abandon()
                raise
    return ResolvedImage(str(ref), manifest_digest, installed, blobs, image.compressed_size, image.disk_size,
                         layers_pending, clone.cloned, clone.base, list(clone.blobs))


def load_image(store: Store, manifest_digest: str) -> TartImage:
    return parse_manifest(store.read_manifest(manifest_digest), manifest_digest)


def _installed(ctx: PullContext, ref: Reference, manifest_digest: str) -> bool:
    """True once any pull (another process, another flow run) has installed this VM and it is
    intact (intact.py): the remaining steps have nothing left to do, and its blobs may already
    be gone. A damaged copy is not installed: it is pulled again, reusing what still verifies
    (its own disk layers included, reuse.py), and replaced at install. CacheLayoutError when
    the cache has a link where a pull would write (tartcache.py), before anything is fetched."""
    return ctx.cache.installed(ref, manifest_digest)


def _say_why_not_current(ctx: PullContext, ref: Reference, manifest_digest: str) -> None:
    target = ctx.cache.digest_dir(ref, manifest_digest)
    if os.path.lexists(target) and (reason := intact.problem(target)) is not None:
        reporter().note(f"the cached copy at {target} is not intact ({reason}); pulling it again, "
                        "reusing what still verifies")


@dataclass(frozen=True)
class Outputs:
    """Whether what the fetch and verify steps produced for an image is still on disk: the
    question a flow asks before it lets a cached result of theirs count as done."""

    store: Store
    staging: Staging
    sizes: dict[str, int]

    def fetched(self, digest: str) -> bool:
        """The blob is committed in the store, or verified into the staging VM."""
        return self.store.has_blob(digest, self.sizes[digest]) or self.staging.is_verified(digest)

    def verified(self, digest: str) -> bool:
        """Everything the blob provides is verified into the staging VM."""
        return self.staging.is_verified(digest)


@translate_os_errors
def outputs(ctx: PullContext, manifest_digest: str) -> Outputs:
    image = load_image(ctx.store, manifest_digest)
    return Outputs(ctx.store, Staging(ctx.store, image), {d.digest: d.size for d in image.blobs})


@translate_os_errors
def fetch(
    ctx: PullContext, reference: str, manifest_digest: str, digest: str,
    gate: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> FetchResult:
    """Obtain blob ``digest``: from the store, from a VM in Tart's cache, or over the network.

    ``gate`` is entered around network transfers only (a fleet-wide egress limit, say).
    """
    image = load_image(ctx.store, manifest_digest)
    desc = next(d for d in image.blobs if d.digest == digest)
    ref = parse_reference(reference)
    try:
        if not _installed(ctx, ref, manifest_digest):
            return _fetch(ctx, ref, image, desc, gate)
    except StoreError:
        # Another pull of this image installed it meanwhile, taking the staging VM with it.
        if not _installed(ctx, ref, manifest_digest):
            raise
    return _done_elsewhere(desc)


def _done_elsewhere(desc: Descriptor) -> FetchResult:
    """Nothing to fetch: another pull installed the VM or verified the blob into staging."""
    reporter().skip(desc.size)
    return FetchResult(desc.digest, desc.size, "", 0, desc.size, 0.0, verified=True)


def _fetch(
    ctx: PullContext, ref: Reference, image: TartImage, desc: Descriptor,
    gate: Callable[[], AbstractContextManager[object]],
) -> FetchResult:
    digest, store = desc.digest, ctx.store
    if Staging(store, image).is_verified(digest):  # by an earlier run whose result Prefect did not keep
        return _done_elsewhere(desc)
    stored = store.has_blob(digest, desc.size)
    if not stored and store.wait_for_ingest(digest, on_wait=lambda holder: waiting_note(desc, holder)):
        # A pull of another image sharing this blob is fetching it; it keeps no compressed
        # bytes when it decodes them on the way in, but its verified layer can be copied.
        stored = store.has_blob(digest, desc.size)
    if not stored and reuse_local(ctx.cache, Staging(store, image), digest):
        reporter().skip(desc.size)
        return FetchResult(digest, desc.size, "", 0, 0, 0.0, reused=desc.size, verified=True)
    # --- peers (issue 16): layers from other runners, verified against this manifest ---
    if not stored and ctx.settings.peers:
        started = time.monotonic()
        got = fetch_from_peers(ctx.settings.peers, Staging(store, image), desc,
                               read_timeout=ctx.settings.read_timeout)
        if got is not None:
            return FetchResult(digest, desc.size, "", 0, 0, time.monotonic() - started, verified=True, peer=got.wire)
    # --- end peers ---
    client, policy = ctx.client(ref), ctx.policy
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
                return digest in staged_blobs(store, besides=image.manifest_digest)

            return fetch_blob(store, client, ref.repository, desc, policy, fill, keep=wanted_elsewhere)


@translate_os_errors
def verify(ctx: PullContext, reference: str, manifest_digest: str, digest: str) -> int:
    """Decode (disk) or place (config, NVRAM) blob ``digest`` in the staging VM, verified.

    Returns the number of decoded bytes written by this call (0 when already done).
    """
    if _installed(ctx, parse_reference(reference), manifest_digest):
        return 0
    store = ctx.store
    image = load_image(store, manifest_digest)
    staging = Staging(store, image)
    if staging.is_verified(digest):  # taken from Tart's cache, or done by an earlier run
        return 0
    blob = store.blob_path(digest)
    written = 0
    for name, desc in (("config.json", image.config), ("nvram.bin", image.nvram)):
        if desc.digest == digest:
            try:
                staging.place(name, desc, blob.read_bytes())
            except DigestMismatchError:
                # Verified when committed, changed since (a disk fault, a hand edit): dropped,
                # so the next run's fetch step finds it missing and downloads it again.
                blob.unlink(missing_ok=True)
                raise StoreError(f"{name} in tartflow's store ({store.root}) no longer matches its digest and "
                                 "was removed; run the same command again to fetch it again") from None
    try:
        for index, layer in enumerate(image.disk_layers):
            if layer.blob.digest == digest and staging.decode(index, blob):
                written += layer.uncompressed_size
    except StoreError:
        if _installed(ctx, parse_reference(reference), manifest_digest):
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
def assemble(ctx: PullContext, reference: str, manifest_digest: str) -> str:
    """Install the verified VM into Tart's cache; returns its digest directory."""
    ref = parse_reference(reference)
    cache, store = ctx.cache, ctx.store
    target = cache.digest_dir(ref, manifest_digest)
    if cache.installed(ref, manifest_digest):
        return str(cache.install(ref, manifest_digest))
    image = load_image(store, manifest_digest)
    staging = Staging(store, image)
    with staging.locked():
        if not cache.installed(ref, manifest_digest):
            staging.check_complete()
            staging.sync()
            cache.install(ref, manifest_digest, staging.dir)
        else:
            cache.install(ref, manifest_digest)
    staging.discard_state()
    _release_blobs(store, image)
    return str(target)




def _release_blobs(store: Store, image: TartImage, digests: list[str] | None = None) -> None:
    """Drop compressed blobs of this image (all, or ``digests``) whose decoded form is kept,
    unless another staging VM (a pull in progress) still lists them."""
    wanted = staged_blobs(store, besides=image.manifest_digest)
    for digest in digests if digests is not None else [d.digest for d in image.blobs]:
        if digest not in wanted and not store.ingest_is_locked(digest):
            store.blob_path(digest).unlink(missing_ok=True)
