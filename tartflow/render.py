"""The live progress bar in a terminal (rich): bytes, rate, ETA, layers done/total, and the
reason and length of any wait (egress limit, rate limit) so a stalled-looking pull explains itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .progress import Reporter

__all__ = ["LiveReporter", "showing"]


class LiveReporter(Reporter):
    def __init__(self, stream: TextIO) -> None:
        self.console = Console(file=stream)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[layers]}"), console=self.console,
            transient=False,
        )
        self._task: TaskID = self.progress.add_task("resolving", total=None, layers="")
        self._lock = threading.Lock()
        self._layers = self._layers_done = 0
        self._total = 0

    def plan(self, total_bytes: int, layers: int) -> None:
        with self._lock:
            self._layers, self._total = layers, total_bytes
            self.progress.update(self._task, description="pulling", total=total_bytes,
                                 layers=f"0/{layers} layers verified")

    def advance(self, nbytes: int) -> None:
        self.progress.advance(self._task, nbytes)
        if self._total and self.progress.tasks[0].completed >= self._total:
            # Every byte is here; what remains is decoding and checking the last layers.
            self.progress.update(self._task, description="verifying")

    def skip(self, nbytes: int) -> None:
        self.advance(nbytes)

    def layer_done(self) -> None:
        with self._lock:
            self._layers_done += 1
            self.progress.update(self._task, layers=f"{self._layers_done}/{self._layers} layers verified")

    def waiting(self, reason: str, seconds: float) -> None:
        self.console.print(f"[yellow]{reason}; retrying in {seconds:.0f} s[/yellow]", highlight=False)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)


@contextmanager
def showing(view: Reporter) -> Iterator[None]:
    """Run the live display for the duration of the block (a no-op for non-live reporters)."""
    if isinstance(view, LiveReporter):
        with view.progress:
            yield
    else:
        yield
