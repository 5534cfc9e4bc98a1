"""``tartflow gc``: free what abandoned pulls left in tartflow's store.

Removes, when older than ``older_than`` seconds (by last write) and not locked by a live pull:
partial downloads (``ingest/``), staging VMs (``staging/``) and committed blobs no staging VM
lists. Lock files stay (they are empty, and deleting one another process is opening would let
two processes hold it). Never touches Tart's cache. A lock held by a running pull (flock, released by the kernel
when its process dies, even by kill -9) always protects its files, whatever their age.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TartflowError
from .manifest import parse_manifest
from .staging import staged_blobs
from .store import Store, is_locked

__all__ = ["GcReport", "collect"]


@dataclass
class GcReport:
    freed: int = 0
    removed: list[str] = field(default_factory=list)
    kept_locked: list[str] = field(default_factory=list)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_blocks * 512 or path.stat().st_size
    return sum(_size(p) for p in path.rglob("*") if p.is_file())


def _newest_write(path: Path) -> float:
    times = [path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*") if p.is_file()]
    return max(times)


def collect(store: Store, older_than: float, *, now: float | None = None, keep: str | None = None) -> GcReport:
    """``keep``: a manifest digest whose staging VM and blobs stay whatever their age (the
    pull that is making room for itself)."""
    now = time.time() if now is None else now
    kept_hex = keep.split(":", 1)[-1] if keep else None
    report = GcReport()

    def remove(path: Path, label: str) -> None:
        size = _size(path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        report.freed += size
        report.removed.append(label)

    for ingest in sorted((store.root / "ingest" / "sha256").glob("*")):
        if store.ingest_is_locked("sha256:" + ingest.name):
            report.kept_locked.append(f"partial {ingest.name[:12]} ({store.lock_holder('sha256:' + ingest.name)})")
        elif now - _newest_write(ingest) > older_than:
            remove(ingest, f"partial download {ingest.name[:12]}")
    for staging in sorted(p for p in (store.root / "staging").glob("*") if not p.name.endswith(".state")):
        state = staging.with_name(staging.name + ".state")
        if staging.name == kept_hex:
            continue
        if any(is_locked(lock) for lock in (store.root / "locks" / staging.name).glob("*.lock")):
            report.kept_locked.append(f"staging VM {staging.name[:12]}")
        elif now - _newest_write(staging) > older_than:
            remove(staging, f"staging VM {staging.name[:12]}")
            shutil.rmtree(state, ignore_errors=True)
    wanted = staged_blobs(store)  # what the staging VMs that remain still need
    if keep:
        with contextlib.suppress(TartflowError, OSError):
            wanted |= {d.digest for d in parse_manifest(store.read_manifest(keep), keep).blobs}
    for blob in sorted((store.root / "blobs" / "sha256").glob("*")):
        if "sha256:" + blob.name not in wanted and now - blob.stat().st_mtime > older_than:
            remove(blob, f"blob {blob.name[:12]}")
    return report
