"""Take layers from VMs already on this machine instead of downloading them again.

When a tag moves to a new digest, most disk layers are usually unchanged. Any VM in Tart's
cache whose ``manifest.json`` lists the same compressed digest holds that layer decoded in its
``disk.img``; so does the staging VM of another pull in progress once that layer is done there
(its compressed bytes are dropped at that point, so this is how two pulls of images sharing
layers share the download). The layer is copied locally and verified against the uncompressed
content digest, like a download. Config and NVRAM blobs are stored raw, so a ``config.json``/
``nvram.bin`` whose sha256 is the blob's digest is the blob itself.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import cowbase
from .collect import digest_dirs
from .errors import CorruptLayerError, TartflowError
from .manifest import TartImage, parse_manifest
from .progress import reporter
from .staging import Staging, staged_images
from .tartcache import TartCache

__all__ = ["reuse_local"]


@dataclass(frozen=True)
class _LocalVM:
    path: Path
    image: TartImage
    has_layer: Callable[[int], bool]  # whether disk layer i of ``image`` is in ``path/disk.img``


def _local_vms(cache: TartCache, staging: Staging) -> Iterator[_LocalVM]:
    """VMs in Tart's cache, then the staging VMs of other pulls (their finished layers only)."""
    exclude = staging.image.manifest_digest
    # Digest directories are found without listing them: a listing moves their access time,
    # which prune ranks them by. Entries without disk.img (stacked images) are stepped over.
    hosts = sorted(p for p in cache.oci_root.iterdir() if p.is_dir()) if cache.oci_root.is_dir() else []
    # A damaged copy of this very image (a re-pull replaces it) is a source too: its layers
    # are verified by content digest like any other's. Only a regular disk.img is read from.
    for vm in (vm for host in hosts for vm in digest_dirs(host)):
        disk = _regular(vm / "disk.img")
        if disk is None:
            continue
        try:
            image = parse_manifest((vm / "manifest.json").read_bytes(), vm.name)
        except (TartflowError, OSError):  # collected meanwhile, or not a manifest we can use
            continue
        yield _LocalVM(vm, image, _within(image, disk.st_size))
    for image in staged_images(staging.store, besides=exclude):
        other = Staging(staging.store, image)
        yield _LocalVM(other.dir, other.image, other.layer_done)


def reuse_local(cache: TartCache, staging: Staging, digest: str) -> bool:
    """Fill everything blob ``digest`` provides in ``staging`` from VMs on this machine; True
    if done. A source that fails verification is skipped (the next one, or the network, is tried).
    """
    image = staging.image
    cowbase.verify_cloned(staging, digest)
    for vm in _local_vms(cache, staging):
        if staging.is_verified(digest):
            break
        for name, desc in (("config.json", image.config), ("nvram.bin", image.nvram)):
            if desc.digest == digest and digest in (vm.image.config.digest, vm.image.nvram.digest):
                data = _read_exact(vm.path / name, desc.size)
                if "sha256:" + hashlib.sha256(data).hexdigest() == digest:
                    staging.place(name, desc, data)
        sources = [layer for i, layer in enumerate(vm.image.disk_layers) if layer.blob.digest == digest and vm.has_layer(i)]
        for index, layer in enumerate(image.disk_layers):
            if layer.blob.digest != digest or staging.layer_done(index):
                continue
            for source in sources:
                if source.uncompressed_digest != layer.uncompressed_digest:
                    continue
                try:
                    staging.copy(index, vm.path / "disk.img", source.offset)
                    break
                except CorruptLayerError as exc:
                    reporter().note(f"cached copy in {vm.path} is not usable ({exc}); fetching instead")
                except FileNotFoundError:  # a staging VM installed or collected meanwhile
                    continue
    return staging.is_verified(digest)


def _read_exact(path: Path, size: int) -> bytes:
    """The file's bytes if it is a regular file (not a link) of exactly ``size`` bytes, else b""."""
    try:
        st = path.lstat()
        return path.read_bytes() if stat.S_ISREG(st.st_mode) and st.st_size == size else b""
    except FileNotFoundError:
        return b""


def _regular(path: Path) -> os.stat_result | None:
    try:
        st = path.lstat()
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _within(image: TartImage, disk_size: int) -> Callable[[int], bool]:
    """Whether disk layer i lies inside a ``disk.img`` of ``disk_size`` bytes (a truncated disk
    holds none of the layers past its end)."""
    return lambda i: image.disk_layers[i].offset + image.disk_layers[i].uncompressed_size <= disk_size
