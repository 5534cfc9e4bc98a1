"""Copy-on-write file clones and hole punching, with each platform's own call.

- Linux: the ``FICLONE`` ioctl (XFS with reflink, btrfs, bcachefs), ``fallocate`` with
  ``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE``, and ``FIEMAP`` to count the extents a file
  still shares with its clones.
- macOS: ``clonefile(2)`` (APFS) and ``fcntl(F_PUNCHHOLE)``, both from libSystem via ctypes.

Every call says plainly when the file system cannot do it (``CloneUnsupported``, False, None),
so callers keep today's copy path there: ext4, tmpfs, or a source on another file system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import struct
import sys
import uuid
from pathlib import Path

__all__ = ["CloneUnsupported", "can_clone", "clone_file", "punch_hole", "unshared_bytes"]

_FICLONE = 0x40049409  # _IOW(0x94, 9, int)
_FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
_FIEMAP_EXTENT_LAST, _FIEMAP_EXTENT_SHARED = 0x1, 0x2000
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_F_PUNCHHOLE = 99  # macOS <sys/fcntl.h>
_CLONE_NOFOLLOW = 0x0001
#: errnos meaning "this file system (pair) cannot clone", as opposed to a real I/O failure.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}


class CloneUnsupported(OSError):
    """The file system cannot clone this source into this destination."""


@functools.cache
def _libc() -> ctypes.CDLL:
    name = "libSystem.dylib" if sys.platform == "darwin" else ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True)


def clone_file(src: Path, dst: Path) -> None:
    """Make ``dst`` (which must not exist) a copy-on-write clone of ``src``: no data is copied,
    and the two share blocks until either is written. Raises CloneUnsupported where the file
    system cannot, leaving no ``dst`` behind."""
    if sys.platform == "darwin":
        clonefile = _libc().clonefile
        clonefile.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint32]
        if clonefile(os.fsencode(src), os.fsencode(dst), _CLONE_NOFOLLOW) != 0:
            code = ctypes.get_errno()
            cls = CloneUnsupported if code in _UNSUPPORTED else OSError
            raise cls(code, os.strerror(code), str(dst))
        return
    if not hasattr(fcntl, "ioctl") or not sys.platform.startswith("linux"):
        raise CloneUnsupported(errno.ENOTSUP, "no clone call on this platform", str(dst))
    src_fd = os.open(src, os.O_RDONLY)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        except OSError as exc:
            os.close(dst_fd)
            os.unlink(dst)
            if exc.errno in _UNSUPPORTED:
                raise CloneUnsupported(exc.errno, exc.strerror, str(dst)) from None
            raise
        os.close(dst_fd)
    finally:
        os.close(src_fd)


def can_clone(src_dir: Path, dst_dir: Path) -> bool:
    """Whether files in ``src_dir`` can be cloned into ``dst_dir``: same file system, and that
    file system clones (probed with a small scratch file in ``dst_dir``; ``src_dir``, Tart's
    cache, is never written)."""
    try:
        if os.stat(src_dir).st_dev != os.stat(dst_dir).st_dev:
            return False
    except OSError:
        return False
    return _probe(os.stat(dst_dir).st_dev, dst_dir)


@functools.cache
def _probe(device: int, directory: Path) -> bool:
    """One probe per file system (``device``) and process: cloning support does not change."""
    probe = directory / f".clone-probe-{uuid.uuid4().hex}"
    copy = probe.with_name(probe.name + ".clone")
    try:
        probe.write_bytes(bytes(4096))
        clone_file(probe, copy)
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
        copy.unlink(missing_ok=True)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``length`` bytes at ``offset`` (they read back as zeros, the size stays);
    False where the file system cannot, so the caller writes zeros instead.

    macOS rounds to the file system's block: callers pass block-aligned ranges (disk.py's
    64 KiB chunks are)."""
    if length <= 0:
        return True
    libc = _libc()
    if sys.platform == "darwin":
        # struct fpunchhole { unsigned int fp_flags, reserved; off_t fp_offset, fp_length; }
        arg = ctypes.create_string_buffer(struct.pack("=IIqq", 0, 0, offset, length))
        fcntl_c = libc.fcntl
        fcntl_c.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        return bool(fcntl_c(fd, _F_PUNCHHOLE, arg) == 0)
    fallocate = libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return bool(fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0)


def unshared_bytes(path: Path) -> int | None:
    """Bytes of ``path`` allocated to it alone (extents not shared with a clone): the space it
    adds to the file system. None where FIEMAP is unavailable (macOS, tmpfs)."""
    if not sys.platform.startswith("linux"):
        return None
    count = 256
    header, extent = struct.Struct("=QQIIII"), struct.Struct("=QQQQQIIII")
    total, start = 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            buf = bytearray(header.size + count * extent.size)
            header.pack_into(buf, 0, start, 2**64 - 1 - start, 0, 0, count, 0)
            try:
                fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
            except OSError:
                return None
            mapped = header.unpack_from(buf, 0)[3]
            if not mapped:
                return total
            for i in range(mapped):
                logical, _, length, _, _, flags, *_ = extent.unpack_from(buf, header.size + i * extent.size)
                if not flags & _FIEMAP_EXTENT_SHARED:
                    total += length
                start = logical + length
                if flags & _FIEMAP_EXTENT_LAST:
                    return total
    finally:
        os.close(fd)
