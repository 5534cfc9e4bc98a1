"""Tart's lock on ``OCIs/<host>``: ``flock`` on the directory, waited for out loud.

Tart takes it for a whole ``tart pull`` (tens of minutes) and writes no owner file, so the
holder is named only where the kernel tells: on Linux, ``/proc/locks`` gives the pid of an
flock's holder; elsewhere the message names the path and says another tart or tartflow process
holds it. The wait polls a non-blocking ``flock`` every ``POLL`` seconds, so a stop request
(Ctrl+C, SIGTERM: ``cancel``) ends it at once with ``InterruptedPull``; nothing is lost, as
the staging VM stays where it is until the next run installs it.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import cancel
from .progress import reporter

__all__ = ["POLL", "SAY_AFTER", "held", "held_if_free", "holder"]

#: Seconds between attempts while the lock is held elsewhere.
POLL = 0.2
#: Seconds of waiting before the wait is announced (well inside the promised 2 s).
SAY_AFTER = 0.5


@contextmanager
def held(directory: Path) -> Iterator[None]:
    """Hold the lock on ``directory`` (created if missing), waiting as long as it takes."""
    fd = _open(directory)
    try:
        started, said = time.monotonic(), False
        while not _try(fd):
            if not said and time.monotonic() - started >= SAY_AFTER:
                reporter().note(f"waiting for Tart's lock on {directory}: {holder(directory)}; "
                                "it is released when that pull ends (Ctrl+C stops waiting, keeping every byte)")
                said = True
            cancel.sleep(POLL)
        cancel.check()  # a stop requested while the lock came free still stops here
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def held_if_free(directory: Path) -> Iterator[bool]:
    """Hold the lock if nobody does right now (yields True); else yield False at once."""
    fd = _open(directory)
    try:
        got = _try(fd)
        try:
            yield got
        finally:
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    return os.open(directory, os.O_RDONLY)


def _try(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def holder(directory: Path) -> str:
    """Who holds the flock on ``directory``, as precisely as this system can tell."""
    unknown = "another tart or tartflow process holds it (Tart records no owner)"
    try:
        st = os.stat(directory)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return unknown
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; "->" marks a waiter, not a holder
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            pid = fields[4]
            if pid == str(os.getpid()):
                continue
            return f"held by process {pid} ({_command(pid)})"
    return unknown


def _command(pid: str) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    return " ".join(a.decode(errors="replace") for a in argv if a)[:120] or "unknown command"
