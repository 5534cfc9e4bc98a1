"""Whether a digest directory of Tart's cache still holds the VM it is named after.

A re-pull of an image whose digest directory exists asks this before it reports the image
current. Checked, all cheap (a few small reads, one ``stat`` of the disk):

- the directory itself is a real directory, not a symbolic link;
- ``manifest.json`` hashes to the digest the directory is named after, and is a Tart VM manifest;
- ``disk.img`` is a regular file of exactly the size the manifest says: the sum of the disk
  layers' uncompressed sizes (what tartflow writes), or the ``uncompressed-disk-size``
  annotation (which Tart may size the disk to);
- ``config.json`` and ``nvram.bin`` are regular files whose sha256 is their layer's digest
  (they are stored raw, so the file is the blob).

Trusted: the bytes inside ``disk.img``. They were verified against every layer's
uncompressed content digest when they were written (decoded, copied or cloned), and
re-hashing tens of gigabytes on every pull of a current image would turn a no-op into minutes
of disk reads. A disk damaged in place at its right size is not detected here; removing the
image (``tartflow prune``, ``tart delete``) and pulling again is the remedy.

Every file is opened without following a symbolic link, so nothing outside the cache is read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

from .errors import TartflowError
from .manifest import MAX_MANIFEST_SIZE, UNCOMPRESSED_DISK_SIZE, parse_manifest

__all__ = ["problem"]


def problem(path: Path) -> str | None:
    """Why ``path`` (a digest directory ``sha256:<hex>``) is not an intact VM, or None if it is."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "it is not there"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link, not a directory"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    raw = _read_regular(path / "manifest.json", MAX_MANIFEST_SIZE)
    if raw is None:
        return "manifest.json is missing or not a regular file"
    if "sha256:" + hashlib.sha256(raw).hexdigest() != path.name:
        return "manifest.json does not hash to the directory's digest"
    try:
        image = parse_manifest(raw, path.name)
    except TartflowError as exc:
        return f"manifest.json is not a Tart VM manifest ({exc})"
    disk = _lstat_regular(path / "disk.img")
    sizes = {image.disk_size, _declared_disk_size(raw)}
    if disk is None:
        return "disk.img is missing or not a regular file"
    if disk.st_size not in sizes:
        return f"disk.img is {disk.st_size} bytes, the manifest says {image.disk_size}"
    for name, desc in (("config.json", image.config), ("nvram.bin", image.nvram)):
        data = _read_regular(path / name, desc.size)
        if data is None or len(data) != desc.size or "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest:
            return f"{name} is missing or does not match its digest {desc.digest[:19]}"
    return None


def _declared_disk_size(raw: bytes) -> int:
    """The manifest's ``uncompressed-disk-size`` annotation, or -1 (never a file size)."""
    try:
        value = json.loads(raw).get("annotations", {}).get(UNCOMPRESSED_DISK_SIZE, "")
    except (ValueError, AttributeError):
        return -1
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else -1


def _lstat_regular(path: Path) -> os.stat_result | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (not a link) of at most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENXIO):
            return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)
    finally:
        os.close(fd)
