"""What every part of the benchmark shares: units, the repository root, its one error and its log."""

from __future__ import annotations

import sys
import time
from pathlib import Path

MB = 1_000_000
GiB = 1 << 30
MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why and what to do."""


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

