"""Issue 14's benchmark: what ``tartflow pull`` costs when there is nothing to pull, next to
Prefect's minimal flow run on its ephemeral server, and the fixed cost before the first byte of
a cold pull on the ephemeral server (a CI job's machine with no Prefect server configured).

    python -m benchmarks.current [--rounds 5] [--size-mib 64]

All on loopback: a CNCF registry with one synthetic image, a byte-counting proxy in front of it
(tests/support). No ``PREFECT_API_URL``: every command starts from a fresh process, as CI does.
Rounds alternate A B C: (A) ``tartflow pull`` of the image already current in ``TART_HOME``;
(B) ``python noop_flow.py`` (``@flow def noop(): return 1``) on the ephemeral server;
(C) a cold ``tartflow pull --json`` into a fresh ``TART_HOME``: time to its ``start`` line
(manifest resolved) and to the first blob byte the proxy serves (polled every 5 ms), and the
whole pull. Prints medians and the ratio A/B against the target (<= 0.25).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.support.cli import command
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import build_and_push, make_disk
from tests.support.prefectserver import prefect_env
from tests.support.registry import start_registry

TARGET = 0.25
NOOP_FLOW = "from prefect import flow\n\n@flow\ndef noop():\n    return 1\n\nif __name__ == '__main__':\n    noop()\n"


def _env(root: Path, tart_home: Path) -> dict[str, str]:
    env = prefect_env(root / "prefect")  # no PREFECT_API_URL: the ephemeral server, as in CI
    env.update(TART_HOME=str(tart_home))
    env.pop("TARTFLOW_HOME", None)
    return env


def _timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"benchmark: {' '.join(argv)} failed ({done.returncode}): {done.stderr[-1500:]}")
    return seconds


def _cold(argv: list[str], env: dict[str, str], proxy: FaultProxy) -> tuple[float, float, float]:
    """Seconds to the ``start`` line, to the first blob byte served, and to the end."""
    proxy.reset_counters()
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    marks: dict[str, float] = {}

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line)["event"] == "start":
                marks.setdefault("start", time.monotonic() - started)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None and proxy.blob_bytes_served == 0:
        time.sleep(0.005)
    first_byte = time.monotonic() - started
    code = proc.wait(timeout=600)
    total = time.monotonic() - started
    reader.join(10)
    if code:
        raise SystemExit(f"benchmark: cold pull failed ({code})")
    return marks.get("start", float("nan")), first_byte, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=64)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tartflow-bench-current-") as tmp, \
            start_registry(Path(tmp) / "registry") as registry, FaultProxy(registry.url) as proxy:
        root = Path(tmp)
        disk = root / "disk.img"
        make_disk(disk, args.size_mib * 1024 * 1024, seed=14)
        image = build_and_push(registry.url, "bench/current", "v1", disk, layer_size=16 * 1024 * 1024)
        ref = f"{proxy.host}/{image.repository}:{image.tag}"
        pull = [*command(), "pull", "--insecure", ref]
        (root / "noop_flow.py").write_text(NOOP_FLOW)
        noop = [sys.executable, str(root / "noop_flow.py")]
        warm = root / "warm"
        _timed(pull, _env(root, warm))  # the image is current in `warm` from here on
        current, minimal, starts, firsts, colds = [], [], [], [], []
        for i in range(1, args.rounds + 1):
            current.append(_timed(pull, _env(root, warm)))
            minimal.append(_timed(noop, _env(root, warm)))
            home = root / f"cold-{i}"
            s, f, c = _cold([*pull, "--json"], _env(root, home), proxy)
            shutil.rmtree(home, ignore_errors=True)
            starts.append(s)
            firsts.append(f)
            colds.append(c)
            print(f"round {i}: current {current[-1]:.2f} s, minimal flow {minimal[-1]:.2f} s, cold pull: "
                  f"start line {s:.2f} s, first byte {f:.2f} s, done {c:.2f} s", flush=True)
    med = statistics.median
    ratio = med(current) / med(minimal)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {load:.1f} at the end; image {args.size_mib} MiB, "
          f"{len(image.disk_layers)} disk layers; medians of {args.rounds} rounds")
    print(f"  tartflow pull, image current        {med(current):6.2f} s")
    print(f"  Prefect minimal flow (ephemeral)    {med(minimal):6.2f} s")
    print(f"  cold pull: to the start line        {med(starts):6.2f} s")
    print(f"  cold pull: to the first blob byte   {med(firsts):6.2f} s   (fixed cost before any byte)")
    print(f"  cold pull: done                     {med(colds):6.2f} s")
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"{verdict}: current image <= {TARGET}x Prefect's minimal flow run: {ratio:.3f}x")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
