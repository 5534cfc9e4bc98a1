"""Synthetic disk images: the same bytes for the same seed, shaped like a macOS disk.

Random, compressible and zero regions in log-uniform sizes, so LZ4 blocks, stored blocks and
sparse holes all occur; used by :mod:`tests.support.imagebuilder` and the benchmarks.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

__all__ = ["make_disk"]

_PIECE = 4 << 20  # bytes generated per piece

_KINDS = ("random", "compressible", "zero")
_MIXED_WEIGHTS = (35, 40, 25)
_WORDS = [
    *("kernel", "launchd", "mds_stores", "com.apple.xpc", "sandbox", "vnode", "apfs"),
    *("snapshot", "spotlight", "trustd", "/System/Library/Frameworks", "/usr/lib/dyld"),
    *("bundle", "plist", "error", "warning", "info", "debug", "allowed", "denied"),
    *("mounted", "unmounted", "checkpoint", "txid"),
]


def make_disk(path: Path, size: int, *, seed: int, pattern: str = "mixed") -> None:
    """Write a ``size``-byte disk image, the same bytes for the same seed.

    ``pattern`` is ``mixed`` (regions of all three kinds), ``random``, ``compressible`` or
    ``zero``. Region sizes are log-uniform and not aligned to anything. Zero regions are
    skipped with a seek, so the file is sparse where the filesystem allows. Compressible
    regions copy from a pool smaller than LZ4's 64 KiB window, so matches reach back across
    any block boundary an encoder chooses.
    """
    if pattern not in ("mixed", *_KINDS):
        raise ValueError(f"unknown disk pattern {pattern!r}")
    rng = random.Random(seed)
    max_region = max(64 << 10, size // 8)
    with open(path, "wb") as disk:
        pos = 0
        while pos < size:
            length = min(
                size - pos, int(math.exp(rng.uniform(math.log(100), math.log(max_region))))
            )
            kind = rng.choices(_KINDS, _MIXED_WEIGHTS)[0] if pattern == "mixed" else pattern
            if kind == "zero":
                disk.seek(length, 1)
            else:
                disk.writelines(_region(kind, rng, length))
            pos += length
        disk.truncate(size)


def _region(kind: str, rng: random.Random, length: int) -> Iterator[bytes]:
    if kind == "random":
        for start in range(0, length, _PIECE):
            yield rng.randbytes(min(_PIECE, length - start))
        return
    pool = _text_pool(rng, rng.randint(4 << 10, 60 << 10))
    out = bytearray()
    remaining = length
    while remaining:
        start = rng.randrange(len(pool))
        take = min(remaining, rng.randint(16, 8192), len(pool) - start)
        out += pool[start : start + take]
        remaining -= take
        if remaining and rng.random() < 0.03:
            noise = min(remaining, rng.randint(1, 64))
            out += rng.randbytes(noise)
            remaining -= noise
        if len(out) >= _PIECE:
            yield bytes(out)
            out.clear()
    yield bytes(out)


def _text_pool(rng: random.Random, size: int) -> bytes:
    """Log lines, JSON records and key=value lines: what a filesystem full of text holds."""
    lines: list[str] = []
    total = 0
    while total < size:
        shape = rng.randrange(3)
        words = " ".join(rng.choices(_WORDS, k=rng.randint(3, 12)))
        n = rng.randrange(1 << 20)
        if shape == 0:
            line = f"2026-05-{n % 28 + 1:02d}T{n % 24:02d}:{n % 60:02d}:07Z host {words} [{n}]\n"
        elif shape == 1:
            line = json.dumps({"id": n, "kind": rng.choice(_WORDS), "note": words}) + "\n"
        else:
            line = f"{rng.choice(_WORDS)}.{n % 97}={words}\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]
