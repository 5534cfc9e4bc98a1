"""Keeping decoded disk bytes moving through the page cache instead of piling up in it.

A pull writes the decoded disk (tens of GB) into one file, ``disk.img``, through the page cache.
Two helpers, both Linux-only and both best effort (a failure is ignored: the fdatasync before a
layer's done marker is what makes its bytes durable, and reports any error):

- :func:`start_writeback` queues a range for writing to the device without waiting
  (``sync_file_range(SYNC_FILE_RANGE_WRITE)``; ``os`` has no binding, so ctypes). Each layer
  is fdatasynced when it finishes, and an fdatasync of ``disk.img`` writes out the dirty pages
  of every layer in flight: left to itself, each sync waited for all of them, and with layers
  finishing together both cores sat idle for up to half a second each time (4 GiB benchmark:
  70 % busy during the download, 90+ % with this).
- :func:`drop` drops a range's clean pages (``posix_fadvise(POSIX_FADV_DONTNEED)``), once it
  has been written out. The page cache then holds a few tens of MB per layer in flight instead
  of the whole image: a pull no longer pushes the runner's working set out of memory, and it
  reuses the pages it freed instead of taking fresh ones. On this VM fresh pages are what cost:
  a cold pull made while an earlier image stayed cached spent 3.6-4.2 s in the kernel instead
  of 1.8 s, and the benchmark's cold pulls ran in that state (kernel time 4-5.7 s).

Elsewhere (macOS) both do nothing: the layer's fdatasync does the writing, and the page cache
keeps what it keeps, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from typing import Any

__all__ = ["drop", "start_writeback"]

_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Any:
    """libc's ``sync_file_range``, looked up on first use (so importing loads no library)."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # not Linux: no such call
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_FADVISE = getattr(os, "posix_fadvise", None) if hasattr(os, "POSIX_FADV_DONTNEED") else None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Queue ``length`` bytes at ``offset`` for writing to the device; does not wait."""
    function = _sync_file_range()
    if function is not None and length > 0:
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def drop(fd: int, offset: int, length: int) -> None:
    """Drop the clean cached pages of the range; pages still dirty or being written stay."""
    if _FADVISE is not None and length > 0:
        with contextlib.suppress(OSError):
            _FADVISE(fd, offset, length, os.POSIX_FADV_DONTNEED)
