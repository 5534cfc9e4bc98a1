"""Checkpoints of a disk layer decoded as it downloads, so a later run resumes mid-layer.

A layer decoded on the way in keeps no compressed bytes on disk (they never go through the
page cache). What a resume needs instead is small: how many compressed bytes were received
and the running SHA-256 of them, the decoder's state (including the start of the block cut
short, at most one block), and the running SHA-256 of the decoded bytes, which are already
in ``disk.img``. ``fetch`` saves one every ``EVERY`` bytes or ``EVERY_SECONDS``, whichever
comes first (the latter only once more bytes came in than it carries), and when a download
stops for a reason it can catch (Ctrl+C, retries exhausted): a kill -9 costs a layer at most
the last quarter second or 8 MiB of its download, or one block on a very slow link.

A resume re-reads the decoded part of that layer (not of finished layers) and checks it
against the checkpoint's hash before trusting it; if it differs, the layer starts over.
A checkpoint is not fsynced: it vouches for decoded bytes still in the page cache, which
survive the process, not the machine. So it carries the boot it was written in and counts
only in the same boot; after a reboot the layer starts over (finished
layers are fsynced before their done marker and are always kept). Where the boot cannot be
told, checkpoints are off and the compressed bytes are kept on disk as before.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import sys
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import sha256
from .disk import LayerState
from .lz4apple import DecoderState

__all__ = ["EVERY", "EVERY_SECONDS", "Checkpoint", "boot_id", "load", "newest", "possible", "save"]

#: A layer's download saves a checkpoint once this many compressed bytes or this many seconds
#: went by since its last one: the most a kill -9 can cost it.
EVERY = 8 * 1024 * 1024
EVERY_SECONDS = 0.25
_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    blob: str  # the compressed blob's digest
    received: int  # compressed bytes received and hashed
    blob_hash: bytes  # Sha256 state after them
    layer: LayerState


@functools.cache
def boot_id() -> str | None:
    """Something that changes with every boot of this machine, or None if unknown here."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None  # Linux
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            libc = ctypes.CDLL("/usr/lib/libSystem.B.dylib")
            value, size = ctypes.create_string_buffer(16), ctypes.c_size_t(16)  # struct timeval
            if libc.sysctlbyname(b"kern.boottime", value, ctypes.byref(size), None, ctypes.c_size_t(0)) == 0:
                return "boottime-" + value.raw[: size.value].hex()
        except (OSError, AttributeError):
            pass
    return None


def possible() -> bool:
    """Checkpoints work here: the boot can be told and SHA-256 states can be saved."""
    return boot_id() is not None and sha256.available()


def save(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` over the slot file at ``path`` with one ``pwrite``, not fsynced.

    Replacing a file by rename makes ext4 flush the new file's data first (auto_da_alloc),
    ~13 ms per checkpoint here, so a slot is overwritten in place instead. A kill during the
    write can leave it torn: the CRC rejects it, and callers alternate between two slots so
    the previous checkpoint is still whole.
    """
    state = checkpoint.layer.decoder
    head = {
        "version": _VERSION, "boot": boot_id(), "blob": checkpoint.blob, "received": checkpoint.received,
        "blob_hash": checkpoint.blob_hash.hex(), "decoded_hash": checkpoint.layer.decoded_hash.hex(),
        "offset": state.offset, "decoded": state.decoded, "stored_left": state.stored_left,
        "pending": len(state.pending),
    }
    record = json.dumps(head).encode() + b"\n" + state.pending
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        data = memoryview(b"%08x\n" % zlib.crc32(record) + record)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, data[offset:], offset)
    finally:
        os.close(fd)


def load(path: Path, blob: str) -> Checkpoint | None:
    """The checkpoint in the slot file at ``path`` if it is for ``blob``, whole, and from this
    boot; else None. Bytes past the record (from a longer earlier one) are ignored."""
    try:
        raw = path.read_bytes()
        crc, line, rest = raw[:8], *raw[9:].split(b"\n", 1)
        head = json.loads(line)
        pending = rest[: int(head["pending"])]
        if int(crc, 16) != zlib.crc32(line + b"\n" + pending):
            return None
        if (head.get("version"), head.get("blob")) != (_VERSION, blob) or len(pending) != head["pending"]:
            return None
        if boot_id() is None or head.get("boot") != boot_id():
            return None
        state = DecoderState(int(head["offset"]), int(head["decoded"]), int(head["stored_left"]), pending)
        if state.received != int(head["received"]):  # every byte fed is consumed or pending
            return None
        layer = LayerState(state, bytes.fromhex(head["decoded_hash"]))
        return Checkpoint(blob, int(head["received"]), bytes.fromhex(head["blob_hash"]), layer)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def newest(paths: Iterable[Path], blob: str) -> tuple[int, Checkpoint] | None:
    """The whole checkpoint for ``blob`` that got furthest among the slot files ``paths``, with
    its slot's place in ``paths``; None if no slot holds one."""
    found: tuple[int, Checkpoint] | None = None
    for i, path in enumerate(paths):
        loaded = load(path, blob)
        if loaded is not None and (found is None or loaded.received > found[1].received):
            found = i, loaded
    return found
