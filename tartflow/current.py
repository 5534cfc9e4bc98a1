"""Is an image already current in Tart's cache? Answered from the registry's manifest and the
cache alone, without a store, a staging VM or Prefect: what ``tartflow pull`` asks first when no
Prefect server is configured, so CI jobs that pull at every start pay a manifest request, not
an ephemeral server.

Current means what ``tart pull`` would leave: the digest the reference resolves to (an index
resolves to its darwin/arm64 manifest) is a complete VM in the cache and, for a tag, the tag's
link points at it. A current image gets its access time refreshed, as a pull would, so Tart's
prune-by-access-time keeps what CI keeps using.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .context import PullContext
from .errors import ImageFormatError
from .manifest import DOCKER_LIST, OCI_INDEX, media_type_of, parse_manifest, pick_from_index
from .reference import Reference, parse_reference
from .registry.retry import retrying
from .store import translate_os_errors

__all__ = ["CurrentImage", "if_current", "resolve_manifest"]


@dataclass(frozen=True)
class CurrentImage:
    reference: str
    digest: str
    path: Path
    compressed_size: int
    disk_size: int


def resolve_manifest(ctx: PullContext, ref: Reference) -> tuple[bytes, str]:
    """The bytes and digest of the VM manifest ``ref`` names (an index resolved once)."""
    client = ctx.client(ref)
    got = retrying(lambda: client.get_manifest(ref.repository, ref.reference), ctx.policy)
    if media_type_of(got.raw, got.media_type) in (OCI_INDEX, DOCKER_LIST):
        chosen = pick_from_index(got.raw)
        got = retrying(lambda: client.get_manifest(ref.repository, chosen.digest), ctx.policy)
        if media_type_of(got.raw, got.media_type) in (OCI_INDEX, DOCKER_LIST):
            raise ImageFormatError(f"{ref}: an image index points to another index; not a Tart VM image")
    return got.raw, got.digest


@translate_os_errors
def if_current(ctx: PullContext, reference: str) -> CurrentImage | None:
    """The cached VM when ``reference`` is current (its access time refreshed), else None."""
    ref = parse_reference(reference)
    raw, digest = resolve_manifest(ctx, ref)
    if not ctx.cache.current(ref, digest):
        return None
    image = parse_manifest(raw, digest)
    path = ctx.cache.digest_dir(ref, digest)
    ctx.cache.mark_accessed(path)
    return CurrentImage(str(ref), digest, path, image.compressed_size, image.disk_size)
