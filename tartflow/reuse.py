"""Take layers from VMs already in Tart's cache instead of downloading them again.

When a tag moves to a new digest, most disk layers are usually unchanged. Any VM in the cache
whose ``manifest.json`` lists the same compressed digest holds that layer decoded in its
``disk.img``; it is copied locally and verified against the uncompressed content digest, like a
download. Config and NVRAM blobs are stored raw, so a cached ``config.json``/``nvram.bin``
whose sha256 is the blob's digest is the blob itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptLayerError, TartflowError
from .manifest import TartImage, parse_manifest
from .progress import reporter
from .staging import Staging
from .tartcache import TartCache

__all__ = ["reuse_local"]


@dataclass(frozen=True)
class _CachedVM:
    path: Path
    image: TartImage


def _cached_vms(cache: TartCache, exclude: str) -> Iterator[_CachedVM]:
    if not cache.oci_root.is_dir():
        return
    for manifest in cache.oci_root.rglob("sha256:*/manifest.json"):
        vm = manifest.parent
        if vm.name == exclude or vm.is_symlink() or not cache.is_vm(vm):
            continue
        try:
            yield _CachedVM(vm, parse_manifest(manifest.read_bytes(), vm.name))
        except (TartflowError, OSError):
            continue


def reuse_local(cache: TartCache, staging: Staging, digest: str) -> bool:
    """Fill everything blob ``digest`` provides in ``staging`` from Tart's cache; True if done.

    A source that fails verification is skipped (the next one, or the network, is tried).
    """
    image = staging.image
    for vm in _cached_vms(cache, exclude=image.manifest_digest):
        if staging.is_verified(digest):
            break
        for name, desc in (("config.json", image.config), ("nvram.bin", image.nvram)):
            if desc.digest == digest and digest in (vm.image.config.digest, vm.image.nvram.digest):
                data = (vm.path / name).read_bytes() if (vm.path / name).stat().st_size == desc.size else b""
                if "sha256:" + hashlib.sha256(data).hexdigest() == digest:
                    staging.place(name, desc, data)
        sources = [layer for layer in vm.image.disk_layers if layer.blob.digest == digest]
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
    return staging.is_verified(digest)
