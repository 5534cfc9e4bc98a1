"""Issue 6's benchmark: how fast, how heavy and how resumable a cold ``tartflow pull`` is, next
to ``skopeo copy`` and to the raw limit of the registry (every blob fetched at once with curl).

Run from the repository root::

    python -m benchmarks.bench                       # 4 GiB image, 3 rounds, RSS at 1 and 8 GiB
    python -m benchmarks.bench --disk-gib 1 --rounds 1 --skip-8gib   # a quick check
    python -m benchmarks.bench --rev HEAD            # the committed code, not the working tree

By default the installed ``tartflow`` console script (the working tree, for an editable
install) is measured; ``--rev`` measures a ``git archive`` snapshot of a commit instead.

What it does, all on loopback:

- Builds synthetic Tart images (random, compressible and zero regions; ``--layer-mib`` layers)
  into a CNCF distribution registry whose storage lives under ``--workdir`` (default
  ``./.bench``), once: a small JSON per image describes it, and later runs reuse both after
  checking that the registry still holds every blob. Each run starts a registry on that storage.
- Starts one ``prefect server`` for the run, as on a fleet runner; every tartflow (and the
  minimal Prefect flow) talks to it through ``PREFECT_API_URL``.
- Primes the page cache with one untimed fetch of every blob, then runs A B C A B C ... for
  ``--rounds``: (A) a cold ``tartflow pull --insecure`` into a fresh, empty ``TART_HOME``;
  (B) ``skopeo copy`` to a ``dir:`` (fetch and verify, no decoding); (C) every blob fetched in
  parallel by one curl process each. ``sync`` runs before each timed command, outside its time.
- Then: re-pull of the cached image vs Prefect's minimal flow run; finishing a pull that was
  SIGKILLed when half of its compressed bytes were on disk vs a cold pull; peak RSS of a cold
  pull at ``--rss-sizes`` GiB of disk.
- Prints the machine, the exact commands, a table of medians and PASS/FAIL against the targets
  of issue 6, all computed from what was measured. Saves the report and the raw figures (JSON)
  under ``<workdir>/results/``.

Measurement: each command is spawned and reaped by a small launcher interpreter (see
``LAUNCHER``); wall time is from spawn to reap, CPU is user+sys of the command and the
descendants it reaped (``os.wait4``), peak RSS is its ``ru_maxrss`` (KiB on Linux, bytes on
macOS).
On Linux the CPU used meanwhile by the registry and by the Prefect server is read from /proc.
MB is 10^6 bytes throughout.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator, Sequence

from benchmarks.common import REPO_ROOT, BenchError
from benchmarks.runner import Bench
from tests.support.registry import RegistryStartError

__all__ = ["main"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--disk-gib", type=float, default=4.0, help="disk size of the main image (default 4)")
    parser.add_argument("--layer-mib", type=int, default=256, help="uncompressed size of a disk layer (default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each measurement (default 3)")
    parser.add_argument("--rss-sizes", default="1,8", help="disk sizes (GiB) for the peak RSS comparison (default 1,8)")
    parser.add_argument("--skip-8gib", action="store_true", help="leave 8 GiB (and larger) out of --rss-sizes")
    parser.add_argument("--concurrency", type=int, default=None, help="pass --concurrency N to tartflow (default: its own)")
    parser.add_argument("--workdir", default=str(REPO_ROOT / ".bench"),
                        help="images, registry storage and results are kept here (default ./.bench)")
    parser.add_argument("--rev", default=None,
                        help="measure the committed tartflow/ flows/ tasks/ of this git revision (a `git archive` "
                             "snapshot on PYTHONPATH) instead of the installed console script")
    parser.add_argument("--keep-run-dir", action="store_true", help="keep this run's temporary directory (logs, homes)")
    args = parser.parse_args(argv)
    try:
        if any(float(s) <= 0 for s in args.rss_sizes.split(",") if s.strip()):
            raise ValueError
    except ValueError:
        parser.error(f"--rss-sizes wants positive sizes in GiB separated by commas, got {args.rss_sizes!r}")
    if args.rounds < 1 or args.disk_gib <= 0 or args.layer_mib < 1:
        parser.error("--rounds, --disk-gib and --layer-mib must be positive")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _cleanup_guard() -> Iterator[contextlib.ExitStack]:
    """An ExitStack whose cleanup a second Ctrl+C or a SIGTERM cannot cut short."""
    stack = contextlib.ExitStack()
    try:
        yield stack
    finally:
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            stack.close()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Explicitly: a shell that starts us in the background may have left SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _cleanup_guard() as stack:
            return Bench(args, stack).run()
    except KeyboardInterrupt:
        print("bench: interrupted; registry, servers and temporary files cleaned up", file=sys.stderr)
        return 130
    except (BenchError, RegistryStartError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

