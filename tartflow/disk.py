"""Write a disk layer's decoded bytes at its offset in ``disk.img``, keeping the file sparse.

Zero runs are not written (the file was created at full size with ``truncate``, so holes read
as zeros). When a region may hold bytes from an earlier, failed attempt or from the cached disk
it was cloned from (``dirty``), a zero chunk where the file does not already read as zeros is
punched into a hole (written as zeros where holes cannot be punched), so stale bytes never
survive and holes stay holes. Memory is one decoded block plus the 64 KiB LZ4 window.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cancel, pagecache
from .clone import punch_hole
from .errors import CorruptLayerError
from .lz4apple import WINDOW, AppleLZ4Decoder, DecoderState
from .manifest import DiskLayer
from .progress import reporter
from .sha256 import Sha256

__all__ = ["ZERO_CHUNK", "LayerDecoder", "LayerState", "LayerWriter", "copy_layer", "decode_layer"]

#: Granularity of hole detection: small enough to find holes inside blocks, large enough that
#: the Python loop over chunks costs nothing next to decoding.
ZERO_CHUNK = 64 * 1024
_ZEROS = bytes(ZERO_CHUNK)
#: Compressed bytes read from a stored blob per decoder feed (decoded bytes go straight to the
#: writer, so memory is one block whatever this is).
_FEED = 1024 * 1024
#: Plain reads of already decoded bytes (local copies from Tart's cache).
_READ = 4 * 1024 * 1024
#: Decoded bytes after which a writer has the kernel start writing them out and drops from
#: the page cache the stretch before, written out meanwhile (pagecache.py).
_WRITEBACK = 32 * 1024 * 1024


#: Decodes at once in this process: decoding is CPU-bound, so more than one per core gains
#: nothing, and each holds a feed's output; bounding them keeps memory flat however many
#: layers an image has.
DECODE_SLOTS = threading.BoundedSemaphore(os.cpu_count() or 2)


def decode_layer(blob: Path, layer: DiskLayer, disk_fd: int, *, dirty: bool) -> None:
    """Decode ``blob`` into ``disk_fd`` at ``layer.offset``; raise CorruptLayerError unless the
    decoded bytes match the layer's uncompressed size and content digest exactly."""
    while not DECODE_SLOTS.acquire(timeout=0.5):
        cancel.check()  # a Ctrl+C must not wait for other layers' decodes
    try:
        decoder = LayerDecoder(layer, disk_fd, dirty=dirty)
        with open(blob, "rb") as src:
            while data := src.read(_FEED):
                decoder.feed(data)
                cancel.check()
        decoder.verify()
    finally:
        DECODE_SLOTS.release()


def copy_layer(source: Path, source_offset: int, layer: DiskLayer, disk_fd: int, *, dirty: bool) -> None:
    """Copy an already decoded layer from another VM's ``disk.img`` (holes read back as zeros
    and stay holes), verified against the layer's content digest like a decode."""
    writer = _Writer(layer, disk_fd, dirty, f"local copy of layer {layer.blob.digest[:19]}")
    with open(source, "rb") as src:
        src.seek(source_offset)
        left = layer.uncompressed_size
        while left and (data := src.read(min(_READ, left))):
            left -= len(data)
            writer.write(data)
            cancel.check()
    writer.verify()


@dataclass(frozen=True)
class LayerState:
    """A layer decoded part way: the decoder's state and the running hash of its output."""

    decoder: DecoderState
    decoded_hash: bytes  # a Sha256 state


class LayerDecoder:
    """Decodes one disk layer from compressed bytes handed over in any slices (straight from
    the network, or read back from a blob) into ``disk.img``, verified as it goes.

    ``reset()`` starts the layer over (a restarted download); from then on the region may hold
    stale bytes, so zero chunks are cleared where needed instead of skipped. A ``resumable``
    decoder hashes with :class:`Sha256`, so ``snapshot()`` can save where it stands and a
    decoder made with ``resume=`` goes on from there (its window read back from ``disk.img``),
    once the decoded bytes there hash to what the snapshot saw (ValueError if not).
    """

    def __init__(
        self, layer: DiskLayer, disk_fd: int, *, dirty: bool, resumable: bool = False, resume: LayerState | None = None
    ) -> None:
        self.layer, self.fd, self._dirty = layer, disk_fd, dirty
        self.resumable = resumable or resume is not None
        self.verified = False
        self._start(resume)

    def _start(self, resume: LayerState | None = None) -> None:
        what = f"disk layer {self.layer.blob.digest[:19]}"
        size = self.layer.uncompressed_size
        if resume is None:
            self._decoder = AppleLZ4Decoder(size)
            self._writer = _Writer(self.layer, self.fd, self._dirty, what, Sha256() if self.resumable else None)
            return
        done = resume.decoder.decoded
        hasher = Sha256(resume.decoded_hash)
        if sha256_of(self.fd, self.layer.offset, done) != hasher.hexdigest():
            raise ValueError("the decoded bytes on disk are not those the checkpoint saw")
        window = os.pread(self.fd, min(WINDOW, done), self.layer.offset + done - min(WINDOW, done))
        self._writer = _Writer(self.layer, self.fd, self._dirty, what, hasher)
        self._writer.position += done
        self._decoder = AppleLZ4Decoder.resumed(size, resume.decoder, window, self._writer.write)

    def reset(self) -> None:
        if self._writer.position != self.layer.offset:
            self._dirty = True
        self._start()

    @property
    def pending(self) -> int:
        """Compressed bytes a snapshot would have to carry (the start of the block cut short)."""
        return self._decoder.pending

    def snapshot(self) -> LayerState:
        """Where this resumable decoder stands; everything decoded so far is in ``disk.img``."""
        hasher = self._writer.hasher
        assert isinstance(hasher, Sha256), "snapshot() needs a resumable decoder"
        return LayerState(self._decoder.snapshot(), hasher.state())

    def feed(self, data: bytes | memoryview) -> None:
        self._decoder.feed(data, self._writer.write)  # each block written as soon as decoded

    def verify(self) -> None:
        """After the last compressed byte: raise CorruptLayerError unless the stream ended
        cleanly and the layer has exactly its declared size and content digest."""
        self._decoder.finish()
        self._writer.verify()
        self.verified = True


class _Writer:
    """Writes decoded bytes from ``layer.offset`` on, hashing as they pass; ``verify`` raises
    CorruptLayerError unless exactly ``uncompressed_size`` bytes with ``uncompressed_digest``
    went by."""

    def __init__(self, layer: DiskLayer, fd: int, dirty: bool, what: str, hasher: Any = None) -> None:
        self.layer, self.fd, self.dirty, self.what = layer, fd, dirty, what
        self.hasher = hasher if hasher is not None else hashlib.sha256()
        self.position = layer.offset
        self.end = layer.offset + layer.uncompressed_size
        self.flushed = self.dropped = layer.offset  # write-out started / pages dropped up to here

    def write(self, piece: bytes | memoryview) -> None:
        if self.position + len(piece) > self.end:
            raise CorruptLayerError(f"{self.what} is longer than its declared {self.layer.uncompressed_size} bytes")
        _write_sparse(self.fd, piece, self.position, self.dirty)  # first: if it fails, nothing counted it
        self.hasher.update(piece)
        self.position += len(piece)
        if self.position - self.flushed >= _WRITEBACK:
            pagecache.drop(self.fd, self.dropped, self.flushed - self.dropped)
            self.dropped = self.flushed
            pagecache.start_writeback(self.fd, self.flushed, self.position - self.flushed)
            self.flushed = self.position

    def verify(self) -> None:
        size = self.layer.uncompressed_size
        if self.position != self.end:
            raise CorruptLayerError(f"{self.what} has {self.position - self.layer.offset} bytes, not the declared {size}")
        actual = "sha256:" + self.hasher.hexdigest()
        if actual != self.layer.uncompressed_digest:
            raise CorruptLayerError(f"{self.what} has content {actual[:19]}..., not "
                                    f"{self.layer.uncompressed_digest[:19]}... as the manifest says")
        reporter().layer_done()


#: Decoded bytes from elsewhere (peers) go through the same sparse, verifying writer.
LayerWriter = _Writer


def sha256_of(fd: int, offset: int, length: int) -> str:
    """Hex sha256 of ``length`` bytes of ``fd`` at ``offset`` (fewer if the file ends first);
    interruptible between reads, since it may read a whole layer."""
    hasher = hashlib.sha256()
    while length > 0:
        data = os.pread(fd, min(_READ, length), offset)
        if not data:
            break
        hasher.update(data)
        offset, length = offset + len(data), length - len(data)
        cancel.check()
    return hasher.hexdigest()


def _write_sparse(fd: int, data: bytes | memoryview, offset: int, dirty: bool) -> None:
    view = memoryview(data)
    size = view.nbytes
    if not size:
        return
    # Chunks are aligned with the file's blocks: a leading partial chunk first. A chunk is
    # zero when the zero buffer starts with it: a memcmp on the view, which stops at the first
    # non-zero byte (mostly the first) and copies nothing.
    first = min(size, (-offset) % ZERO_CHUNK or ZERO_CHUNK)
    bounds = [0, *range(first, size, ZERO_CHUNK), size]
    run_start = -1  # start of a pending run of non-zero chunks, written with one pwrite
    for start, stop in itertools.pairwise(bounds):
        chunk = view[start:stop]
        if _ZEROS.startswith(chunk):
            if run_start >= 0:
                _pwrite_all(fd, view[run_start:start], offset + run_start)
                run_start = -1
            if dirty:
                _clear_if_needed(fd, chunk.nbytes, offset + start)
        elif run_start < 0:
            run_start = start
    if run_start >= 0:
        _pwrite_all(fd, view[run_start:], offset + run_start)


def _clear_if_needed(fd: int, length: int, offset: int) -> None:
    """Stale bytes under a zero chunk (an earlier attempt's, or a cloned base's) become a hole
    where the file system can punch one, so a clone costs no space for zeros; else zeros."""
    if os.pread(fd, length, offset).count(0) != length and not punch_hole(fd, offset, length):
        _pwrite_all(fd, memoryview(_ZEROS)[:length], offset)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written

