"""Progress reporting: the core tells a Reporter what happens; the CLI or a log renders it.

The core calls the process-wide reporter (``reporter()``); the CLI installs a live bar, and
anywhere else (a Prefect worker) progress goes to the ``tartflow`` logger no more often than
every ``interval`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["LogReporter", "Reporter", "reporter", "set_reporter"]

log = logging.getLogger("tartflow")


class Reporter:
    """Receives progress events; every method may be called from many threads.

    ``started`` and ``blob_done`` come from the layer above the core (the flow, or the CLI's
    answer for a current image): the image a pull resolved, and what each blob cost once it
    is done (``sources``: bytes per source, e.g. ``{"registry": n, "tart cache": m}``).
    """

    def started(self, reference: str, digest: str, compressed_size: int, disk_size: int, layers: int) -> None: ...
    def blob_done(self, digest: str, size: int, sources: dict[str, int]) -> None: ...
    def plan(self, total_bytes: int, layers: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def skip(self, nbytes: int) -> None: ...
    def layer_done(self) -> None: ...
    def waiting(self, reason: str, seconds: float) -> None: ...
    def note(self, text: str) -> None: ...


class LogReporter(Reporter):
    """Plain log lines, throttled, for non-terminals and workers."""

    def __init__(self, interval: float = 5.0, emit: Callable[[str], None] | None = None) -> None:
        self.interval = interval
        self._emit = emit
        self._lock = threading.Lock()
        self._total = self._done = self._layers = self._layers_done = 0
        self._started = self._last = time.monotonic()

    def plan(self, total_bytes: int, layers: int) -> None:
        with self._lock:
            self._total, self._layers = total_bytes, layers
            self._started = self._last = time.monotonic()  # first progress line one interval in
        self._say(f"pulling {total_bytes / 1e6:.1f} MB, {layers} disk layers to verify")

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            now = time.monotonic()
            if now - self._last < self.interval:
                return
            self._last = now
            done, total, layers_done = self._done, self._total, self._layers_done
            rate = done / max(now - self._started, 1e-6)
        pct = 100.0 * done / total if total else 100.0
        self._say(f"{pct:.1f}% {done / 1e6:.1f}/{total / 1e6:.1f} MB at {rate / 1e6:.1f} MB/s, "
                  f"{layers_done}/{self._layers} layers verified")

    def skip(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes

    def layer_done(self) -> None:
        with self._lock:
            self._layers_done += 1

    def waiting(self, reason: str, seconds: float) -> None:
        self._say(f"{reason}; retrying in {seconds:.0f} s", logging.WARNING)

    def note(self, text: str) -> None:
        self._say(text)

    def _say(self, text: str, level: int = logging.INFO) -> None:
        if self._emit is not None:
            self._emit(text)
        else:
            log.log(level, "%s", text)


_current: Reporter = LogReporter()


def reporter() -> Reporter:
    return _current


def set_reporter(new: Reporter) -> Reporter:
    """Install ``new``; returns the previous reporter so callers can restore it."""
    global _current
    previous, _current = _current, new
    return previous
