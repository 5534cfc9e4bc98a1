"""Start a staging ``disk.img`` as a copy-on-write clone of the most similar cached disk.

A refresh of a tag usually changes a few 512 MiB chunks; an image built on another shares most
of its disk with it. Where the file system clones (APFS, XFS with reflink, btrfs: clone.py),
the staging disk starts as a clone of the cached VM whose ``manifest.json`` lists the most
layer bytes at the same offset with the same uncompressed content digest (any image in Tart's
cache, not only the tag's previous version; entries without ``disk.img``, such as stacked
images, are stepped over). Those layers then cost neither a write nor space; the range of every
other layer is punched into a hole in the clone and written as today (zero runs stay holes).
Where punching fails, the layer is written over the base's stale bytes instead, as a dirty
layer whose zero runs are cleared (disk.py). Layers found only at another offset are copied by
reuse.py, as before.

Verification: a cloned layer counts as done only once its bytes are known to match its
uncompressed digest, one of two ways, chosen per base:

- trusted: the base's ``disk.img`` is one tartflow itself verified layer by layer and
  installed, and is provably unchanged since: its (device, inode, size, mtime) still equal what
  was recorded right before it moved into Tart's cache (``record_verified``, in the store's
  ``manifests/verified/<hex>.json``, kept like the manifests; any write to the
  file moves its mtime, and Tart never writes a cached image, ``tart clone`` clones it). Its
  cloned layers are marked done at once, after the clone is durable: a refresh then costs what
  changed.
- re-hashed: any other base (pulled by Tart itself, which verifies no digest; recorded stats
  that no longer match; or ``TARTFLOW_COW_VERIFY=rehash``) has each cloned layer read back and
  hashed (a read, no write) before it counts; one that does not match is written as if there
  had been no clone. Reading is cheap next to writing, but at a few hundred MB/s of SHA-256 it
  is most of a refresh's time (benchmarks/cow.py measures both).

Crash safety: the clone is made under a temporary name, the layers it does not provide are
punched into holes (or, where that fails, get dirty markers), cloned layers get dirty markers,
the clone is fsynced and the provenance (``clone.json``) written, and only then is the clone
renamed to ``disk.img``. A crash before the rename leaves no ``disk.img`` (the next run clones again); a
crash after it leaves cloned layers that are not done, which are re-hashed, never trusted
blindly: only done markers written after the durable clone say a layer is verified.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .clone import CloneUnsupported, can_clone, clone_file, punch_hole, unshared_bytes
from .disk import sha256_of
from .errors import CorruptLayerError, TartflowError
from .manifest import DiskLayer, TartImage, parse_manifest
from .progress import reporter
from .reference import digest_hex
from .store import atomic_write, fsync_dir

if TYPE_CHECKING:
    from .fetch import FetchResult
    from .staging import Staging
    from .tartcache import TartCache

__all__ = ["Base", "CloneSummary", "RefreshReport", "choose_base", "clone_summary", "net_new_space",
           "record_verified", "refresh_report", "start_from_clone", "verify_cloned"]

PROVENANCE = "clone.json"


@dataclass(frozen=True)
class Base:
    """A cached VM to clone, and which disk layers of the new image it already holds."""

    path: Path  # the digest directory in Tart's cache
    image: TartImage
    layers: tuple[int, ...]  # indices into the new image's disk layers
    shared: int  # their uncompressed bytes


@dataclass(frozen=True)
class CloneSummary:
    base: str  # the base's digest directory, "" when the disk did not start from a clone
    cloned: int  # uncompressed bytes of layers the clone provides (verified or still to verify)
    blobs: tuple[str, ...] = ()  # their blob digests


@dataclass(frozen=True)
class RefreshReport:
    """What a pull cost: decoded bytes taken from a clone, compressed bytes copied from other
    local VMs and fetched over the network, and the space the new disk adds (None: unknown)."""

    cloned: int
    copied: int
    fetched: int
    net_new: int | None


def refresh_report(cloned: int, cloned_blobs: Collection[str], results: Iterable[FetchResult],
                   disk: Path) -> RefreshReport:
    """A pull's cost from ``ResolvedImage.cloned``/``cloned_blobs``, its fetch results (a cloned
    layer's blob counts as cloned, not copied) and its installed ``disk.img``."""
    results = list(results)
    copied = sum(r.reused for r in results if r.digest not in cloned_blobs)
    return RefreshReport(cloned, copied, sum(r.fetched for r in results), net_new_space(disk))


def choose_base(cache: TartCache, image: TartImage) -> Base | None:
    """The cached VM sharing the most layer bytes with ``image`` at the same offsets, or None."""
    wanted = {(layer.offset, layer.uncompressed_size, layer.uncompressed_digest): i
              for i, layer in enumerate(image.disk_layers)}
    best: Base | None = None
    if not cache.oci_root.is_dir():
        return None
    for manifest in sorted(cache.oci_root.rglob("sha256:*/manifest.json")):
        vm = manifest.parent
        if vm.name == image.manifest_digest or vm.is_symlink() or not cache.is_vm(vm):
            continue
        try:
            other = parse_manifest(manifest.read_bytes(), vm.name)
        except (TartflowError, OSError):
            continue
        hits = tuple(sorted(i for layer in other.disk_layers
                            if (i := wanted.get((layer.offset, layer.uncompressed_size, layer.uncompressed_digest)))
                            is not None))
        shared = sum(image.disk_layers[i].uncompressed_size for i in hits)
        if shared and (best is None or shared > best.shared):
            best = Base(vm, other, hits, shared)
    return best


def start_from_clone(staging: Staging, cache: TartCache) -> bool:
    """Create the staging ``disk.img`` (absent; the caller holds the VM lock) as a clone of the
    best base; False, with nothing created, where there is none or cloning is unavailable."""
    base = choose_base(cache, staging.image)
    if base is None or not can_clone(base.path, staging.dir):
        return False
    disk = staging.dir / "disk.img"
    tmp = staging.dir / "disk.img.clone"
    tmp.unlink(missing_ok=True)
    trusted = _trusted(staging, base)
    try:
        clone_file(base.path / "disk.img", tmp)
    except (CloneUnsupported, FileNotFoundError):  # e.g. the base was pruned meanwhile
        return False
    trusted = trusted and _trusted(staging, base)  # unchanged from before the clone to after it
    staging.state.mkdir(parents=True, exist_ok=True)
    for stale in staging.state.glob("layer-*"):  # markers that would describe another disk
        stale.unlink()
    with open(tmp, "r+b") as f:
        f.truncate(staging.image.disk_size)
        for index, layer in enumerate(staging.image.disk_layers):
            # A layer the base does not hold becomes a hole (no stale byte to read back and
            # clear, zero runs stay holes); a cloned one, or one that cannot be punched, holds
            # the base's bytes until verified, so it is dirty: a write over it clears zero runs.
            if index in base.layers or not punch_hole(f.fileno(), layer.offset, layer.uncompressed_size):
                (staging.state / f"layer-{index}.dirty").touch()
        os.fsync(f.fileno())
    atomic_write(staging.state / PROVENANCE, json.dumps({
        "base": str(base.path), "base_manifest": base.image.manifest_digest,
        "layers": list(base.layers), "trusted": trusted}).encode())
    os.rename(tmp, disk)
    fsync_dir(staging.dir)
    reporter().note(f"disk starts as a clone of {base.path} ({base.shared / 1e9:.2f} GB shared, "
                    f"{'trusted' if trusted else 're-hashed'})")
    if trusted:
        for index in base.layers:
            staging.fill(index, lambda fd, dirty: None)
    return True


def verify_cloned(staging: Staging, digest: str) -> int:
    """Count the cloned layers made of blob ``digest`` as done once their bytes hash to their
    uncompressed digest (a read, no write); returns the bytes verified. A layer that does not
    match stays dirty and is filled another way."""
    verified = 0
    for index in _cloned(staging):
        layer = staging.image.disk_layers[index]
        if layer.blob.digest != digest or staging.layer_done(index):
            continue

        def rehash(fd: int, dirty: bool, layer: DiskLayer = layer) -> None:
            _check_digest(fd, layer)

        try:
            if staging.fill(index, rehash):
                verified += layer.uncompressed_size
        except CorruptLayerError as exc:
            reporter().note(f"cloned layer {index} is not usable ({exc}); filling it another way")
    return verified


def clone_summary(staging: Staging) -> CloneSummary:
    provenance = _provenance(staging)
    if not provenance:
        return CloneSummary("", 0)
    layers = [staging.image.disk_layers[i] for i in _cloned(staging)]
    return CloneSummary(str(provenance["base"]), sum(layer.uncompressed_size for layer in layers),
                        tuple(sorted({layer.blob.digest for layer in layers})))


def net_new_space(disk: Path) -> int | None:
    """Bytes ``disk`` occupies that no clone shares (Linux FIEMAP); None where unknown."""
    try:
        return unshared_bytes(disk)
    except OSError:
        return None


def record_verified(staging: Staging) -> None:
    """Remember that this staging ``disk.img`` was verified complete, as it is right now, so a
    later refresh may clone it without reading it back (see the module docstring)."""
    st = os.stat(staging.dir / "disk.img")
    atomic_write(_record_path(staging, staging.image.manifest_digest), json.dumps(_identity(st)).encode())


def _trusted(staging: Staging, base: Base) -> bool:
    if os.environ.get("TARTFLOW_COW_VERIFY") == "rehash":
        return False
    try:
        recorded = json.loads(_record_path(staging, base.image.manifest_digest).read_bytes())
        return bool(recorded == _identity(os.stat(base.path / "disk.img")))
    except (OSError, ValueError):
        return False


def _identity(st: os.stat_result) -> dict[str, int]:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _record_path(staging: Staging, manifest_digest: str) -> Path:
    directory = staging.store.root / "manifests" / "verified"  # kept as long as the manifests
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{digest_hex(manifest_digest)}.json"


def _provenance(staging: Staging) -> dict[str, object] | None:
    try:
        loaded = json.loads((staging.state / PROVENANCE).read_bytes())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _cloned(staging: Staging) -> list[int]:
    provenance = _provenance(staging)
    if not provenance or not (staging.dir / "disk.img").exists():
        return []
    count = len(staging.image.disk_layers)
    raw = provenance.get("layers")
    return [i for i in raw if isinstance(i, int) and 0 <= i < count] if isinstance(raw, list) else []


def _check_digest(fd: int, layer: DiskLayer) -> None:
    if "sha256:" + sha256_of(fd, layer.offset, layer.uncompressed_size) != layer.uncompressed_digest:
        raise CorruptLayerError(f"bytes at offset {layer.offset} do not hash to {layer.uncompressed_digest[:19]}...")
