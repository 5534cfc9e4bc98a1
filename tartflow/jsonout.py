"""``tartflow pull --json``: one JSON object per line, for orchestrators (schema in README).

Every object has ``event`` and ``time`` (Unix seconds). Events, in order:
``start`` (image, digest, sizes), ``progress`` (no more often than ``interval``; bytes, rate,
layers), ``layer`` once per blob done (its sources and bytes), ``waiting``/``note`` as they
happen, and exactly one ``end`` (status, exit code, and for a failure the error's class and
message). Lines are written whole under a lock and flushed, so a reader can parse each line as
it arrives.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, TextIO

from .tally import Tally

__all__ = ["JsonLines"]


class JsonLines(Tally):
    def __init__(self, stream: TextIO, interval: float = 1.0) -> None:
        super().__init__()
        self.stream = stream
        self.interval = interval
        self._write_lock = threading.Lock()
        self._last = 0.0

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}, separators=(",", ":"))
        with self._write_lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def started(self, reference: str, digest: str, compressed_size: int, disk_size: int, layers: int) -> None:
        super().started(reference, digest, compressed_size, disk_size, layers)
        self.emit("start", image=reference, digest=digest, compressed_bytes=compressed_size,
                  disk_bytes=disk_size, layers=layers)

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        now = time.monotonic()
        if now - self._last >= self.interval:  # a race here costs at most one extra line
            self._last = now
            self.progress()

    def progress(self) -> None:
        s = self.snapshot()
        self.emit("progress", bytes=s.done, total_bytes=s.total, percent=round(s.percent, 2),
                  rate=round(s.rate), eta=None if s.eta is None else round(s.eta, 1),
                  layers_done=s.layers_done, layers=s.layers)

    def blob_done(self, digest: str, size: int, sources: dict[str, int]) -> None:
        super().blob_done(digest, size, sources)
        main = max(sources, key=lambda k: sources[k]) if sources else "none"
        self.emit("layer", digest=digest, size=size, source=main, bytes=sources)

    def waiting(self, reason: str, seconds: float) -> None:
        self.emit("waiting", reason=reason, seconds=round(seconds, 1))

    def note(self, text: str) -> None:
        self.emit("note", text=text)

    def end(self, status: str, exit_code: int, error: BaseException | None = None, **fields: Any) -> None:
        if error is not None:
            fields.update(error_class=type(error).__name__, error=str(error))
        self.emit("end", status=status, exit_code=exit_code, **fields)
