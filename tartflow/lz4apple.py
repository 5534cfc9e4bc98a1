"""Apple's framed LZ4 (``COMPRESSION_LZ4``), the compression of Tart disk layers.

A stream is a sequence of blocks (TART_FORMAT.md, "Disk layer compression"):
``bv41`` + u32 LE decoded size + u32 LE encoded size + an LZ4 *block*; ``bv4-`` + u32 LE size +
raw bytes; ``bv4$`` ends the stream. The 64 KiB LZ4 window runs across blocks of one stream, so
a block may copy from the output of earlier blocks, stored ones included; a block decoded on its
own is wrong on real images. Block format: https://github.com/lz4/lz4/blob/dev/doc/lz4_Block_format.md
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import re
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

import lz4.block

from . import native
from .errors import CorruptLayerError

__all__ = ["AppleLZ4Decoder", "DecoderState", "encode", "encode_bytes"]

WINDOW = 64 * 1024
_COMPRESSED, _STORED, _END = b"bv41", b"bv4-", b"bv4$"
_U32 = struct.Struct("<I")
_U32X2 = struct.Struct("<II")
_FF_RUN = re.compile(rb"\xff*")
_MAX_RATIO = 255  # one LZ4 input byte never expands to more than 255 output bytes

Chunk: TypeAlias = "bytes | memoryview"


def _bound(size: int) -> int:
    """LZ4_compressBound(size) plus slack: no honest encoder emits a bigger block."""
    return size + size // 255 + 16 + 64


def _with_prefix(block: memoryview, prefix: Chunk) -> bytes:
    """Rewrite an LZ4 block so that it first outputs ``prefix`` (made literals of its first sequence).

    Decoding against ``prefix`` as one contiguous output instead of an external dictionary gives
    the same bytes and the same bounds checks, but liblz4 copies a match that runs from the
    dictionary on into the output byte by byte: a run of zeros at a block start decodes ~20x
    slower that way. Raises IndexError if the first literal length runs past the block.
    """
    token = block[0]
    literals, end = token >> 4, 1
    if literals == 15:
        run = _FF_RUN.match(block, 1)  # literal length 15 + 255 per 0xFF byte + the next byte
        end = run.end() if run else 1
        literals += 255 * (end - 1) + block[end]
        end += 1
    n = len(prefix) + literals
    if n < 15:
        head = bytes(((n << 4) | (token & 15),))
    else:
        runs, rest = divmod(n - 15, 255)
        head = b"".join((bytes((0xF0 | (token & 15),)), b"\xff" * runs, bytes((rest,))))
    return b"".join((head, prefix, block[end:]))


@functools.cache
def _native() -> Any:
    """``LZ4_decompress_safe_usingDict`` of the liblz4 that python-lz4 compiles into its own
    extension (so the same code as ``lz4.block``), if that exports it and passes a self-test.
    Loaded and tested once, by the first decoder made (never at import); each decoder keeps
    what it got, so the per-block path pays no lookup.

    python-lz4's ``decompress`` mallocs the output, decodes without the GIL, then copies the
    output into a new ``bytes`` with the GIL held. For a layer that is a second copy of every
    decoded byte, plus fresh pages for each block, and the copies of the four layers in flight
    queue on the GIL: 0.6 s of GIL time per 4 GiB. Called directly, it decodes into a buffer
    the decoder reuses, the GIL released for the whole call. With the output right after the
    window in that buffer, liblz4 takes the window as a prefix, as fast as ``_with_prefix``.
    """
    try:
        from lz4.block import _block

        function = ctypes.CDLL(_block.__file__).LZ4_decompress_safe_usingDict
    except (ImportError, OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    function.restype = ctypes.c_int
    return function if _native_works(function) else None


def _native_works(function: Any) -> bool:
    data = bytes(range(256)) * 1024  # 256 KiB: the second half copies from the first
    block = lz4.block.compress(data[WINDOW:], store_size=False, dict=data[:WINDOW])
    out = ctypes.create_string_buffer(len(data))
    ctypes.memmove(out, data, WINDOW)
    pinned = native.pin(block)
    try:
        n = function(pinned.buf, ctypes.addressof(out) + WINDOW, pinned.len, len(data) - WINDOW, ctypes.addressof(out), WINDOW)
    finally:
        native.unpin(pinned)
    return n == len(data) - WINDOW and out.raw == data



@dataclass(frozen=True)
class DecoderState:
    """Where a decoder stands, to resume it later: ``offset`` compressed bytes consumed (up to
    the last whole block), ``decoded`` bytes output, ``stored_left`` raw bytes still due from
    a stored block cut short, and ``pending``, the start of the block cut short (the input
    received past ``offset``). Resuming also needs the last 64 KiB of output (the window)."""

    offset: int
    decoded: int
    stored_left: int
    pending: bytes

    @property
    def received(self) -> int:
        """Compressed bytes fed in: where the stream continues."""
        return self.offset + len(self.pending)


class AppleLZ4Decoder:
    """Streaming decoder of one Apple-framed LZ4 stream that must decode to ``expected_size``.

    Feed it any slices of the stream; it yields decoded chunks in order. Memory stays bounded by
    one block (at most ``max_block_size`` decoded) plus the window plus the latest feed, whatever
    the stream's length. Every violation of the format raises :class:`CorruptLayerError` with a
    one-line message; after that the decoder is spent and every call raises the same error.
    Sizes are checked from block headers before anything is allocated, so a stream can never make
    the decoder output more than ``expected_size`` bytes nor allocate more than one block.
    """

    def __init__(self, expected_size: int, *, max_block_size: int = 64 * 1024 * 1024) -> None:
        if expected_size < 0 or max_block_size <= 0:
            raise ValueError("expected_size must be >= 0 and max_block_size > 0")
        self._expected = expected_size
        self._max_block = max_block_size
        self._buf = bytearray()  # unconsumed input; only ever holds part of one block
        self._offset = 0  # compressed offset of the first unconsumed byte
        self._decoded = 0
        self._done = False
        self._stored_left = 0  # raw bytes still due from the current stored block
        self._recent: deque[Chunk] = deque()  # last outputs, together covering the window
        self._recent_len = 0
        self._error: str | None = None
        self._parsed = 0  # progress of the current _parse, for a sink that fails
        self._topping_up = False  # _parse is reading the buffered block, not the input
        self._reuse = False  # decode into _scratch: chunks go to a sink, which keeps none
        self._scratch: ctypes.Array[ctypes.c_char] | None = None  # window, then a block's output
        self._scratch_view = memoryview(b"")
        self._native = _native()  # liblz4 called directly, or None: lz4.block.decompress

    @property
    def decoded(self) -> int:
        """Bytes output so far."""
        return self._decoded

    @property
    def pending(self) -> int:
        """Input bytes held for the block cut short (what a snapshot must carry)."""
        return len(self._buf)

    def snapshot(self) -> DecoderState:
        """The state to resume from with :meth:`resumed`; only while healthy and not done."""
        if self._error is not None or self._done:
            raise RuntimeError("a failed or finished decoder has nothing to resume")
        return DecoderState(self._offset, self._decoded, self._stored_left, bytes(self._buf))

    @classmethod
    def resumed(
        cls, expected_size: int, state: DecoderState, window: bytes, sink: Callable[[Chunk], None], **kwargs: int
    ) -> AppleLZ4Decoder:
        """A decoder that goes on from ``state``; ``window`` is the output's last
        ``min(64 KiB, state.decoded)`` bytes (read back from where they were written). The
        pending input is fed again at once, its output going to ``sink``: it may hold whole
        blocks (those a failed sink did not take), and the stream may have nothing more to add."""
        if len(window) != min(WINDOW, state.decoded) or state.decoded > expected_size:
            raise ValueError("window or state does not fit the stream")
        decoder = cls(expected_size, **kwargs)
        decoder._offset, decoder._decoded, decoder._stored_left = state.offset, state.decoded, state.stored_left
        if window:
            decoder._recent.append(window)
            decoder._recent_len = len(window)
        decoder.feed(state.pending, sink)
        return decoder

    @property
    def done(self) -> bool:
        """True once the end-of-stream marker has been seen."""
        return self._done

    def feed(self, data: bytes | bytearray | memoryview, sink: Callable[[Chunk], None] | None = None) -> list[Chunk]:
        """Consume ``data`` (any slice of the stream, split anywhere); return decoded chunks.

        Chunks are ``bytes`` or read-only views the decoder never writes to again. Stored
        blocks in immutable ``bytes`` input come back as views of it, without a copy; from
        mutable input they are copied. Only the tail of a block cut by a split is buffered.
        Everything ``data`` completes is returned at once, up to ~255x its size for runs of
        zeros, so feed pieces of moderate size (64 KiB to 1 MiB) ... unless a ``sink`` is
        given: then each chunk goes to ``sink`` as soon as it is decoded and the list stays
        empty, so memory is one block whatever the size of ``data``. A chunk given to a sink
        is valid only during that call: decoded blocks share one buffer, so a sink that keeps
        bytes must copy them.
        """
        if self._error is not None:
            raise CorruptLayerError(self._error)
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        out: list[Chunk] = []
        emit = sink or out.append
        self._reuse = sink is not None
        taken = 0
        try:
            while self._buf and taken < len(mv):  # top up the cut block, no more
                more = mv[taken : taken + max(0, self._missing())]  # none if a failed sink left whole blocks
                self._buf += more
                taken += len(more)
                self._topping_up = True
                with memoryview(self._buf) as view:
                    end = self._parse(view, emit, False)
                self._topping_up = False
                del self._buf[:end]  # O(1): CPython advances a bytearray's start in place
                self._offset += end
            if taken < len(mv):
                end = self._parse(mv[taken:], emit, isinstance(mv.obj, bytes))
                self._buf += mv[taken + end :]
                self._offset += end
        except CorruptLayerError:
            self._buf = bytearray()  # a traceback may still pin views of the old buffer
            raise
        except BaseException:
            # The sink failed (a full disk, say). What it took stays taken and the rest, from
            # the block it failed on, waits as input: the state stays exact for a snapshot.
            parsed = self._parsed
            if self._topping_up:
                self._topping_up = False
                self._offset += parsed
                # A new buffer, not a resize: views of the old one (the block the sink failed
                # on) live on in the traceback, and resizing an exported bytearray raises BufferError.
                self._buf = self._buf[parsed:] + mv[taken:]
            else:
                self._offset += parsed
                self._buf += mv[taken + parsed :]
            raise
        return out

    def _missing(self) -> int:
        """Bytes still missing from the block header or block cut short in the buffer."""
        have = len(self._buf)
        if have < 12:  # a stored header or the end marker never stays in the buffer whole
            return (4 if have < 4 else 8 if self._buf[:4] == _STORED else 12) - have
        return 12 + _U32.unpack_from(self._buf, 8)[0] - have

    def finish(self) -> None:
        """Raise :class:`CorruptLayerError` unless the stream ended, complete and exact."""
        if self._error is not None:
            raise CorruptLayerError(self._error)
        if self._buf or self._stored_left:
            self._fail("truncated block", self._offset)
        if not self._done:  # the size was checked against expected_size at the marker
            self._fail("no end-of-stream marker", self._offset)

    def _fail(self, what: str, at: int, cause: Exception | None = None) -> NoReturn:
        self._error = f"disk layer is corrupt: {what} at compressed offset {at}"
        raise CorruptLayerError(self._error) from cause

    def _parse(self, src: memoryview, emit: Callable[[Chunk], None], borrowed: bool) -> int:
        """Decode every complete block (and any available stored bytes) in ``src``.

        Returns how many bytes of ``src`` were consumed; the rest is an incomplete block.
        """
        n, i = len(src), 0
        while i < n:
            self._parsed = i  # consumed before this block, should the sink fail on it
            if self._stored_left:
                take = min(self._stored_left, n - i)
                piece = src[i : i + take]
                self._emit(piece if borrowed else piece.tobytes(), emit)
                self._stored_left -= take
                i += take
                continue
            at = self._offset + i
            if self._done:
                self._fail("data after the end-of-stream marker", at)
            magic = src[i : i + 4].tobytes()
            if magic == _END:
                if self._decoded != self._expected:
                    self._fail(f"stream ends after {self._decoded} of {self._expected} bytes", at)
                self._done = True
                i += 4
            elif magic == _STORED:
                if n - i < 8:
                    break
                (size,) = _U32.unpack_from(src, i + 4)
                self._check_size(size, at)
                self._stored_left = size
                i += 8
            elif magic == _COMPRESSED:
                if n - i < 12:
                    break
                dsize, esize = _U32X2.unpack_from(src, i + 4)
                self._check_size(dsize, at)
                if esize > _bound(dsize) or dsize > _MAX_RATIO * esize:
                    self._fail(f"impossible LZ4 block of {esize} -> {dsize} bytes", at)
                if n - i < 12 + esize:
                    break
                block = src[i + 12 : i + 12 + esize]
                if self._native is not None:
                    self._emit(self._decode_native(block, dsize, at), emit, transient=self._reuse)
                else:
                    self._emit(self._decompress(block, dsize, at), emit)
                i += 12 + esize
            elif len(magic) == 4 or not b"bv4".startswith(magic):
                self._fail(f"bad block magic {magic!r}", at)
            else:
                break  # the start of a magic
        return i

    def _check_size(self, size: int, at: int) -> None:
        if size > self._max_block:
            self._fail(f"block of {size} bytes over the {self._max_block}-byte limit", at)
        if self._decoded + size > self._expected:
            self._fail(f"decodes to more than the expected {self._expected} bytes", at)

    def _decompress(self, block: memoryview, size: int, at: int) -> Chunk:
        window = self._window()
        try:
            src = _with_prefix(block, window) if window else block
            data = lz4.block.decompress(src, uncompressed_size=len(window) + size)
        except (lz4.block.LZ4BlockError, IndexError) as exc:
            self._fail("bad LZ4 block", at, exc)
        if len(data) != len(window) + size:
            self._fail(f"LZ4 block decodes to fewer than {size} bytes", at)
        return memoryview(data)[len(window) :] if window else data

    def _decode_native(self, block: memoryview, size: int, at: int) -> memoryview:
        """Decode ``block`` with the native liblz4 call, into a buffer right after a copy of the
        window. For a sink the buffer is ``_scratch``, reused by the next block; for a caller
        that collects chunks, a new one."""
        window = self._window()
        need = WINDOW + size
        if self._reuse and self._scratch is not None and len(self._scratch) >= need:
            buffer, view = self._scratch, self._scratch_view
        else:
            buffer = ctypes.create_string_buffer(need)
            view = memoryview(buffer).cast("B")
            if self._reuse:  # blocks grew
                self._scratch, self._scratch_view = buffer, view
        start, base = WINDOW - len(window), ctypes.addressof(buffer)
        view[start:WINDOW] = window
        pinned = native.pin(block)
        try:
            n = self._native(pinned.buf, base + WINDOW, pinned.len, size, base + start, len(window))
        finally:
            native.unpin(pinned)
        if n < 0:
            self._fail("bad LZ4 block", at)
        if n != size:
            self._fail(f"LZ4 block decodes to fewer than {size} bytes", at)
        return view[WINDOW:need].toreadonly()

    def _emit(self, piece: Chunk, emit: Callable[[Chunk], None], *, transient: bool = False) -> None:
        """Hand ``piece`` on and keep what the window needs of it (a copy if it is
        ``transient``, i.e. in ``_scratch``, which the next block overwrites)."""
        if not piece:
            return
        emit(piece)
        self._decoded += len(piece)
        if transient:
            piece = bytes(piece[-WINDOW:])
        self._recent.append(piece)
        self._recent_len += len(piece)
        while self._recent_len - len(self._recent[0]) >= WINDOW:
            self._recent_len -= len(self._recent.popleft())

    def _window(self) -> Chunk:
        """The last (up to) 64 KiB of output; copies only when it spans several chunks."""
        recent = self._recent
        excess = max(0, self._recent_len - WINDOW)
        if len(recent) <= 1:
            return memoryview(recent[0])[excess:] if recent else b""
        parts = list(recent)
        parts[0] = memoryview(parts[0])[excess:]
        window = b"".join(parts)
        self._recent, self._recent_len = deque((window,)), len(window)
        return window


def encode(
    data: bytes | memoryview,
    *,
    block_size: int = 1 << 20,
    block_sizes: Sequence[int] | None = None,
    stored: Callable[[int], bool] | None = None,
) -> Iterator[bytes]:
    """Yield ``data`` as an Apple-framed LZ4 stream, one framed block per piece, then ``bv4$``.

    Blocks decode to ``block_size`` bytes (the last may be shorter), or cycle through
    ``block_sizes``. Block ``i`` is stored (``bv4-``) when ``stored(i)`` is true, or when LZ4
    would not make it smaller. Each block is compressed against the previous 64 KiB of input,
    so, like Apple's encoder, blocks reference earlier blocks' output.
    """
    sizes = itertools.cycle(block_sizes) if block_sizes else itertools.repeat(block_size)
    mv = memoryview(data).cast("B")
    pos, index = 0, 0
    while pos < len(mv):
        size = next(sizes)
        if not 0 < size < 1 << 32:
            raise ValueError(f"block size {size} out of range")
        chunk = mv[pos : pos + size]
        body = b""
        if stored is None or not stored(index):
            window = mv[max(0, pos - WINDOW) : pos]
            body = lz4.block.compress(chunk, store_size=False, dict=window)
        if body and len(body) < len(chunk):
            yield _COMPRESSED + _U32X2.pack(len(chunk), len(body)) + body
        else:
            yield _STORED + _U32.pack(len(chunk)) + chunk.tobytes()
        pos += len(chunk)
        index += 1
    yield _END


def encode_bytes(
    data: bytes | memoryview,
    *,
    block_size: int = 1 << 20,
    block_sizes: Sequence[int] | None = None,
    stored: Callable[[int], bool] | None = None,
) -> bytes:
    """The whole stream :func:`encode` would yield, as one ``bytes``."""
    pieces = encode(data, block_size=block_size, block_sizes=block_sizes, stored=stored)
    return b"".join(pieces)
