"""The zero-run representation peers use, so runs of zeros never cross the wire.

Media type ``application/vnd.tartflow.zero-runs.v1``. The body is a sequence of records, each
a 9-byte header ``kind`` (one ASCII byte) + ``length`` (u64, little endian):

- ``D``: ``length`` bytes of data follow;
- ``Z``: ``length`` zero bytes, nothing follows.

Read in order, the records spell out exactly the bytes the request selected (the whole layer, or
the ``Range`` asked for); a body that ends inside a record, or that spells out more or fewer
bytes than the ``Content-Range`` says, is a broken answer. A data record is at most
``MAX_DATA`` bytes, so a receiver never has to hold more than that. The encoder finds zeros by
``SEEK_DATA``/``SEEK_HOLE`` (a sparse 100 GB disk costs nothing to skip) and by ``ZERO_CHUNK``
blocks inside data, the granularity the receiver's sparse writer uses too.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator

from ..disk import ZERO_CHUNK

__all__ = ["MAX_DATA", "ZERO_RUNS", "WireError", "ZeroRunDecoder", "encode_bytes", "encode_file_range"]

ZERO_RUNS = "application/vnd.tartflow.zero-runs.v1"
MAX_DATA = 4 * 1024 * 1024
_HEADER = struct.Struct("<cQ")
_ZEROS = bytes(ZERO_CHUNK)
_READ = 1024 * 1024


class WireError(Exception):
    """A zero-run body that does not parse."""


def _data(piece: memoryview) -> bytes:
    return b"".join(_HEADER.pack(b"D", len(part)) + bytes(part)
                    for part in (piece[i:i + MAX_DATA] for i in range(0, piece.nbytes, MAX_DATA)))


def _zero(length: int) -> bytes:
    return _HEADER.pack(b"Z", length)


def encode_bytes(data: bytes) -> Iterator[bytes]:
    """Small in-memory content (config, NVRAM): zero chunks become Z records as well."""
    yield from _encode_chunks(iter([memoryview(data)]))


def encode_file_range(fd: int, start: int, end: int) -> Iterator[bytes]:
    """Bytes ``[start, end)`` of the open file ``fd``, in records of up to about ``_READ`` bytes."""
    yield from _encode_chunks(_read_with_holes(fd, start, end))


def _read_with_holes(fd: int, start: int, end: int) -> Iterator[memoryview | int]:
    """Data as views, holes as their length (an int): holes are never read."""
    position = start
    while position < end:
        data_at = min(_seek(fd, position, os.SEEK_DATA, end), end)
        if data_at > position:
            yield data_at - position
            position = data_at
            continue
        hole_at = min(_seek(fd, position, os.SEEK_HOLE, end), end)
        while position < hole_at:
            piece = os.pread(fd, min(_READ, hole_at - position), position)
            if not piece:  # the file shrank under us: the receiver will see a short answer
                return
            yield memoryview(piece)
            position += len(piece)


def _seek(fd: int, position: int, whence: int, end: int) -> int:
    """``lseek`` with SEEK_DATA/SEEK_HOLE; where those do not exist, all is data."""
    try:
        return os.lseek(fd, position, whence)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data past ``position``: the rest is a hole
            return end
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return position if whence == os.SEEK_DATA else end
        raise


def _encode_chunks(pieces: Iterator[memoryview | int]) -> Iterator[bytes]:
    """Merge adjacent zeros into one Z record; data runs are cut at ``MAX_DATA``."""
    zeros = 0
    out: list[bytes] = []
    for piece in pieces:
        if isinstance(piece, int):
            zeros += piece
            continue
        run_start = -1
        size = piece.nbytes
        for start in range(0, size, ZERO_CHUNK):
            chunk = piece[start:start + ZERO_CHUNK]
            if _ZEROS.startswith(chunk):
                if run_start >= 0:
                    out.append(_data(piece[run_start:start]))
                    run_start = -1
                zeros += chunk.nbytes
                continue
            if zeros:
                out.append(_zero(zeros))
                zeros = 0
            if run_start < 0:
                run_start = start
        if run_start >= 0:
            out.append(_data(piece[run_start:]))
        if out:
            yield b"".join(out)
            out = []
    if zeros:
        yield _zero(zeros)


class ZeroRunDecoder:
    """Parses a zero-run body handed over in any slices. ``feed`` returns the decoded pieces:
    data as views, zero runs as their length (an int)."""

    def __init__(self) -> None:
        self._header = b""
        self._data_left = 0

    def feed(self, chunk: bytes) -> list[memoryview | int]:
        pieces: list[memoryview | int] = []
        view = memoryview(chunk)
        while view.nbytes:
            if self._data_left:
                take = view[:self._data_left]
                pieces.append(take)
                self._data_left -= take.nbytes
                view = view[take.nbytes:]
                continue
            need = _HEADER.size - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) < _HEADER.size:
                break
            kind, length = _HEADER.unpack(self._header)
            self._header = b""
            if kind == b"Z":
                pieces.append(length)
            elif kind == b"D" and 0 < length <= MAX_DATA:
                self._data_left = length
            else:
                raise WireError(f"bad zero-run record {kind!r} of {length} bytes")
        return pieces

    def finish(self) -> None:
        if self._header or self._data_left:
            raise WireError("answer ended inside a record")
