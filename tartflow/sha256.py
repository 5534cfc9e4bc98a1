"""SHA-256 whose running state can be saved and restored.

A disk layer decoded as it downloads can then resume mid-layer from a small checkpoint instead
of from its compressed bytes kept on disk, so those bytes never go through the page cache.
hashlib cannot export its state; the distribution registry resumes uploads the same way with
Go's marshalable sha256. The hashing is done by the platform's native library through ctypes,
at hashlib's speed and without the GIL: OpenSSL's libcrypto ``SHA256_*`` functions (the library
hashlib itself uses) or CommonCrypto's ``CC_SHA256_*`` on macOS. The state is the library's
context struct, copied as bytes and tagged with the library's name and the struct's size.

A self-test at first use checks that a saved and restored state gives hashlib's digest, for
``bytes``, ``bytearray`` and read-only ``memoryview`` input. Where no library passes it,
``available()`` is False and callers keep the compressed bytes on disk instead, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import sys
from dataclasses import dataclass
from typing import Any

from .native import pin, unpin

__all__ = ["Sha256", "available"]

_CHUNK = 1 << 30  # CommonCrypto takes a 32-bit length


@dataclass(frozen=True)
class _Library:
    kind: str  # the tag a saved state carries
    size: int  # sizeof the context struct
    init: Any  # ctypes function pointers
    update: Any
    final: Any


def _bind(lib: ctypes.CDLL, prefix: str, kind: str, size: int, length: type) -> _Library:
    init, update, final = (getattr(lib, prefix + name) for name in ("Init", "Update", "Final"))
    init.argtypes = [ctypes.c_void_p]
    update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, length]
    final.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return _Library(f"{kind}-{size}", size, init, update, final)


def _candidates() -> list[tuple[str, str, str, int, type]]:
    if sys.platform == "darwin":
        # Never libcrypto.dylib there: the system's unversioned one aborts the process.
        return [("/usr/lib/libSystem.B.dylib", "CC_SHA256_", "commoncrypto", 104, ctypes.c_uint32)]
    names = ["libcrypto.so.3", "libcrypto.so.1.1", ctypes.util.find_library("crypto")]
    return [(name, "SHA256_", "openssl", 112, ctypes.c_size_t) for name in names if name]


@functools.cache
def _library() -> _Library | None:
    for path, prefix, kind, size, length in _candidates():
        try:
            lib = _bind(ctypes.CDLL(path), prefix, kind, size, length)
            if _self_test(lib):
                return lib
        except (OSError, AttributeError):
            continue
    return None


def available() -> bool:
    """True if states can be saved and restored here (the self-test passed)."""
    return _library() is not None


class Sha256:
    """``hashlib.sha256`` with ``state()`` and ``Sha256(state=...)``; needs ``available()``."""

    def __init__(self, state: bytes | None = None, *, lib: _Library | None = None) -> None:
        found = lib or _library()
        if found is None:
            raise RuntimeError("no native SHA-256 library with a resumable state here")
        self._lib = found
        self._ctx = ctypes.create_string_buffer(found.size)
        if state is None:
            found.init(self._ctx)
        else:
            kind, _, raw = state.partition(b":")
            if kind.decode() != found.kind or len(raw) != found.size:
                raise ValueError("a SHA-256 state saved by another library")
            ctypes.memmove(self._ctx, raw, found.size)

    @property
    def kind(self) -> str:
        return self._lib.kind

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = pin(data)
        try:
            for done in range(0, view.len, _CHUNK):
                self._lib.update(self._ctx, view.buf + done, min(_CHUNK, view.len - done))
        finally:
            unpin(view)

    def state(self) -> bytes:
        """The running state, to hand back as ``Sha256(state=...)`` later (same library)."""
        return self._lib.kind.encode() + b":" + self._ctx.raw

    def hexdigest(self) -> str:
        ctx = ctypes.create_string_buffer(self._ctx.raw, self._lib.size)  # Final must not end this one
        digest = ctypes.create_string_buffer(32)
        self._lib.final(digest, ctx)
        return digest.raw.hex()


def _self_test(lib: _Library) -> bool:
    data = bytes(range(256)) * 300
    first = Sha256(lib=lib)
    first.update(data[:1000])
    resumed = Sha256(first.state(), lib=lib)
    resumed.update(bytearray(data[1000:5000]))
    resumed.update(memoryview(data)[5000:])
    return resumed.hexdigest() == hashlib.sha256(data).hexdigest() and first.hexdigest() == hashlib.sha256(data[:1000]).hexdigest()
