"""Cooperative cancellation: SIGINT/SIGTERM set one event that every download and wait checks.

Checked between chunks (at most one chunk, about 1 MiB, after the signal) and during waits, so
a pull stops within a second or two, flushes what it received, and keeps it for the next run.
"""

from __future__ import annotations

import threading

from .errors import InterruptedPull

__all__ = ["check", "request_stop", "reset", "sleep", "stop_requested"]

_stop = threading.Event()


def request_stop() -> None:
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def reset() -> None:
    _stop.clear()


def check() -> None:
    if _stop.is_set():
        raise InterruptedPull("pull interrupted; every byte received is kept: run the same command again to continue")


def sleep(seconds: float) -> None:
    """Sleep, waking at once if a stop is requested."""
    if _stop.wait(max(0.0, seconds)):
        check()
