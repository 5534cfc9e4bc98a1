"""Counting reporters: ``Tally`` keeps the running totals of a pull that machine-readable views
(``--json`` lines, the Prefect progress artifact) publish; ``Tee`` hands every event to several
reporters, so a flow can count beside whatever view the process already shows.

Every event is a few additions under a lock: publishing is the views' business, rate-limited
and off the download threads.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .progress import Reporter

__all__ = ["Snapshot", "Tally", "Tee"]


@dataclass(frozen=True)
class Snapshot:
    """The pull so far. ``rate`` is bytes per second since ``plan``; ``eta`` seconds (None
    while unknown); ``sources`` bytes per source of the blobs already done."""

    reference: str
    digest: str
    total: int
    done: int
    layers: int
    layers_done: int
    blobs_done: int
    elapsed: float
    rate: float
    eta: float | None
    sources: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return min(100.0, 100.0 * self.done / self.total) if self.total else 0.0


class Tally(Reporter):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reference = self.digest = ""
        self._total = self._done = self._layers = self._layers_done = self._blobs_done = 0
        self._sources: dict[str, int] = {}
        self._started = time.monotonic()
        self.changes = 0  # bumped by every event: a view publishes only when it moved

    def started(self, reference: str, digest: str, compressed_size: int, disk_size: int, layers: int) -> None:
        with self._lock:
            self.reference, self.digest = reference, digest
            self.changes += 1

    def plan(self, total_bytes: int, layers: int) -> None:
        with self._lock:
            self._total, self._layers = total_bytes, layers
            self._started = time.monotonic()
            self.changes += 1

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            self.changes += 1

    def skip(self, nbytes: int) -> None:
        self.advance(nbytes)

    def layer_done(self) -> None:
        with self._lock:
            self._layers_done += 1
            self.changes += 1

    def blob_done(self, digest: str, size: int, sources: dict[str, int]) -> None:
        with self._lock:
            self._blobs_done += 1
            for source, nbytes in sources.items():
                self._sources[source] = self._sources.get(source, 0) + nbytes
            self.changes += 1

    def snapshot(self) -> Snapshot:
        with self._lock:
            elapsed = max(time.monotonic() - self._started, 1e-6)
            rate = self._done / elapsed
            left = max(self._total - self._done, 0)
            eta = left / rate if rate > 0 and self._total else None
            return Snapshot(self.reference, self.digest, self._total, self._done, self._layers,
                            self._layers_done, self._blobs_done, elapsed, rate, eta, dict(self._sources))


class Tee(Reporter):
    """Every event to each of ``reporters``, in order."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def started(self, reference: str, digest: str, compressed_size: int, disk_size: int, layers: int) -> None:
        for r in self.reporters:
            r.started(reference, digest, compressed_size, disk_size, layers)

    def blob_done(self, digest: str, size: int, sources: dict[str, int]) -> None:
        for r in self.reporters:
            r.blob_done(digest, size, sources)

    def plan(self, total_bytes: int, layers: int) -> None:
        for r in self.reporters:
            r.plan(total_bytes, layers)

    def advance(self, nbytes: int) -> None:
        for r in self.reporters:
            r.advance(nbytes)

    def skip(self, nbytes: int) -> None:
        for r in self.reporters:
            r.skip(nbytes)

    def layer_done(self) -> None:
        for r in self.reporters:
            r.layer_done()

    def waiting(self, reason: str, seconds: float) -> None:
        for r in self.reporters:
            r.waiting(reason, seconds)

    def note(self, text: str) -> None:
        for r in self.reporters:
            r.note(text)
