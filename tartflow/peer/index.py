"""What this machine can serve to peers: content of complete VMs in Tart's cache, by digest.

No part of a request ever becomes a path: a request names a digest, and the digest is looked up
in an index built by walking ``$TART_HOME/cache/OCIs`` (never following a symbolic link). Only a
digest directory that is a real directory (not a link, and inside the cache once resolved),
holding ``config.json``, ``disk.img`` and ``nvram.bin`` as regular files and a ``manifest.json``
that parses as a Tart VM, counts. Files are opened with ``O_NOFOLLOW`` and must still be the
inode the index saw. A disk layer is served only once its bytes in ``disk.img`` were hashed to
the manifest's uncompressed-content digest (once per file version, remembered in memory); a
config or NVRAM blob only when its bytes hash to the digest asked for.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import TartflowError
from ..manifest import parse_manifest
from ..tartcache import TartCache

__all__ = ["BlobEntry", "CacheIndex", "FoundLayer", "LayerEntry"]

_DIGEST_DIR = re.compile(r"^sha256:[0-9a-f]{64}$")
#: A miss rescans the cache at most this often (pulls finish while we serve).
RESCAN_AFTER = 1.0
_HASH_READ = 4 * 1024 * 1024
_T = TypeVar("_T")


@dataclass(frozen=True)
class LayerEntry:
    vm: Path
    offset: int
    size: int
    digest: str  # uncompressed-content digest


@dataclass(frozen=True)
class BlobEntry:
    vm: Path
    name: str  # config.json or nvram.bin
    size: int


@dataclass(frozen=True)
class FoundLayer:
    """A verified layer: the ``disk.img`` version it was verified in, and where it lies there."""

    vm: Path
    identity: tuple[int, int, int, int]  # dev, ino, size, mtime_ns of that disk.img
    offset: int
    size: int


class CacheIndex:
    def __init__(self, cache: TartCache) -> None:
        self.cache = cache
        self._lock = threading.Lock()
        self._layers: dict[str, list[LayerEntry]] = {}
        self._blobs: dict[str, list[BlobEntry]] = {}
        self._scanned = float("-inf")
        # (digest, vm, dev, ino, size, mtime_ns) of disk.img versions whose layer hashed right
        self._verified: set[tuple[object, ...]] = set()

    def find_layer(self, digest: str) -> FoundLayer | None:
        """The layer with uncompressed-content ``digest``, verified, or None."""
        for entry in self._lookup(lambda: self._layers, digest):
            fd = _open_regular(self._root(), entry.vm, "disk.img")
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                if st.st_size >= entry.offset + entry.size and self._check_layer(fd, st, entry):
                    return FoundLayer(entry.vm, _identity(st), entry.offset, entry.size)
            finally:
                os.close(fd)
        return None

    def open_layer(self, found: FoundLayer) -> int | None:
        """``found``'s ``disk.img`` opened again, if it is still the version that was verified."""
        fd = _open_regular(self._root(), found.vm, "disk.img")
        if fd is not None and _identity(os.fstat(fd)) != found.identity:
            os.close(fd)
            return None
        return fd

    def read_blob(self, digest: str) -> bytes | None:
        """The config or NVRAM blob ``digest`` byte for byte, if a cached VM holds it."""
        for entry in self._lookup(lambda: self._blobs, digest):
            fd = _open_regular(self._root(), entry.vm, entry.name)
            if fd is None:
                continue
            with os.fdopen(fd, "rb") as f:
                data = f.read(entry.size + 1)
            if len(data) == entry.size and "sha256:" + hashlib.sha256(data).hexdigest() == digest:
                return data
        return None

    def _lookup(self, table: Callable[[], dict[str, list[_T]]], digest: str) -> list[_T]:
        """Entries for ``digest``; a miss rescans first (a table is replaced, never changed)."""
        found = table().get(digest)
        if not found:
            self._rescan()
            found = table().get(digest)
        return list(found or [])

    def _root(self) -> str:
        return os.path.realpath(self.cache.oci_root)

    def _check_layer(self, fd: int, st: os.stat_result, entry: LayerEntry) -> bool:
        key = (entry.digest, str(entry.vm), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key in self._verified:
            return True
        hasher = hashlib.sha256()
        position, end = entry.offset, entry.offset + entry.size
        while position < end:
            data = os.pread(fd, min(_HASH_READ, end - position), position)
            if not data:
                return False
            hasher.update(data)
            position += len(data)
        if "sha256:" + hasher.hexdigest() != entry.digest:
            return False
        self._verified.add(key)
        return True

    def _rescan(self) -> None:
        with self._lock:
            if time.monotonic() - self._scanned < RESCAN_AFTER:
                return
            layers: dict[str, list[LayerEntry]] = {}
            blobs: dict[str, list[BlobEntry]] = {}
            for vm in _complete_vms(self.cache):
                try:
                    fd = _open_regular(self._root(), vm, "manifest.json")
                    if fd is None:
                        continue
                    with os.fdopen(fd, "rb") as f:
                        image = parse_manifest(f.read(), vm.name)
                except (TartflowError, OSError, ValueError):
                    continue  # stacked or foreign images, or one removed meanwhile
                for layer in image.disk_layers:
                    layers.setdefault(layer.uncompressed_digest, []).append(
                        LayerEntry(vm, layer.offset, layer.uncompressed_size, layer.uncompressed_digest))
                blobs.setdefault(image.config.digest, []).append(BlobEntry(vm, "config.json", image.config.size))
                blobs.setdefault(image.nvram.digest, []).append(BlobEntry(vm, "nvram.bin", image.nvram.size))
            self._layers, self._blobs = layers, blobs
            self._scanned = time.monotonic()


def _complete_vms(cache: TartCache) -> list[Path]:
    """Digest directories of Tart's cache that are real directories holding a complete VM."""
    root = cache.oci_root
    if not root.is_dir():
        return []
    real_root = os.path.realpath(root)
    vms: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=False):
        keep = []
        for name in dirnames:
            path = Path(dirpath) / name
            if os.path.islink(path):  # tags are links; a linked directory is never entered
                continue
            if _DIGEST_DIR.match(name):
                if _inside(real_root, path) and all(_is_regular(path / f) for f in ("config.json", "disk.img", "nvram.bin")):
                    vms.append(path)
                continue
            keep.append(name)
        dirnames[:] = keep
    return vms


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _inside(real_root: str, path: Path) -> bool:
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def _open_regular(real_root: str, vm: Path, name: str) -> int | None:
    """``vm/name`` opened read-only without following a link, if it is a regular file and
    ``vm`` (checked again now: it may have been swapped since the scan) is inside the cache."""
    if os.path.islink(vm) or not _inside(real_root, vm):
        return None
    try:
        fd = os.open(vm / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd
