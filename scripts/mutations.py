#!/usr/bin/env python3
"""Safety-mutation check: switch off one safety property at a time and see a test fail.

A safety property counts as tested only if switching it off makes a test fail. Each entry of
the table (``tests/mutations/*.toml``, one file per topic so branches add entries without
touching each other's) names a file, an exact piece of its text, what to put instead, and the
tests that must then fail. For each one this script copies the working tree to a temporary
directory once, applies the substitution there, runs the named tests with this checkout's
virtualenv Python (the copy first on ``PYTHONPATH``, so the ``tartflow`` processes that CLI
tests spawn run the mutated code too), and puts the file back.

A mutation *survives* when its tests all pass with it applied: the property is untested.
Exit status: 0 when every mutation was killed, 1 when any survived, 2 when the table is stale
(an ``old`` text is no longer found exactly once, or a named test is gone: fix the entry, never
drop it silently) or the unmutated tests already fail (``--baseline``, the default). The suite
checks the table for staleness on every run (``tests/test_mutation_table.py``).

Runs on demand, not in CI (it runs the named tests once per mutation):

    scripts/mutations.py                 # every entry
    scripts/mutations.py -k copy -k sparse  # entries whose name contains any of these
    scripts/mutations.py --skip-slow     # leave out entries marked slow (CLI and Prefect runs)
    scripts/mutations.py --list          # print the table

An entry (TOML, ``[[mutation]]``): ``name``, ``file``, ``old``, ``new``, ``tests`` (pytest node
ids or files), ``description``, and optionally ``slow = true``. Use literal strings
(``'''...'''``) for code, and enough context in ``old`` to match exactly one place.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "tests" / "mutations"
_IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".mypy_cache",
                                  ".ruff_cache", ".pytest_cache", ".hypothesis")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    description: str
    slow: bool = False
    source: str = ""  # the table file it came from


def load_table(directory: Path = TABLE) -> list[Mutation]:
    mutations: list[Mutation] = []
    for path in sorted(directory.glob("*.toml")):
        with open(path, "rb") as f:
            doc = tomllib.load(f)
        for entry in doc.get("mutation", []):
            unknown = set(entry) - {"name", "file", "old", "new", "tests", "description", "slow"}
            if unknown:
                raise SystemExit(f"{path.name}: entry {entry.get('name')!r} has unknown keys {sorted(unknown)}")
            mutations.append(Mutation(entry["name"], entry["file"], entry["old"], entry["new"],
                                      tuple(entry["tests"]), entry["description"], bool(entry.get("slow", False)),
                                      path.name))
    names = [m.name for m in mutations]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"duplicate mutation names: {duplicates}")
    return mutations


def stale_entries(mutations: list[Mutation], root: Path) -> list[str]:
    """Entries whose ``old`` text is not found exactly once (or whose file is gone), or that
    name a test file or test function that no longer exists (it would run nothing, and the
    mutation would look like a survivor for the wrong reason)."""
    problems = []
    for m in mutations:
        for node in m.tests:
            test_file, _, test = node.partition("::")
            if not (root / test_file).is_file():
                problems.append(f"{m.name} ({m.source}): its test file {test_file} does not exist")
            elif test and f"def {test.split('[', 1)[0]}(" not in (root / test_file).read_text():
                problems.append(f"{m.name} ({m.source}): {test_file} has no test {test}")
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.name} ({m.source}): {m.file} does not exist")
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.name} ({m.source}): its old text is found {count} times in {m.file}, not once")
        if m.old == m.new:
            problems.append(f"{m.name} ({m.source}): old and new are the same")
    return problems


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, tail of the output)."""
    python = ROOT / ".venv" / "bin" / "python"
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    command = [str(python if python.exists() else sys.executable), "-m", "pytest", "-x", "-q",
               "-p", "no:randomly", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return "timeout", time.monotonic() - started, out[-1500:]
    tail = (done.stdout + done.stderr)[-1500:]
    # 4: a node id not found, 5: no test collected: not a kill.
    if done.returncode in (4, 5) or "no tests ran" in done.stdout:
        return "no tests", time.monotonic() - started, tail
    return ("passed" if done.returncode == 0 else "failed"), time.monotonic() - started, tail


def _failure_lines(tail: str) -> list[str]:
    """The lines of pytest's output that say what failed (E lines and the summary)."""
    lines = [line for line in tail.splitlines() if line.startswith(("E ", "FAILED", "ERROR"))]
    return lines[-6:] or tail.splitlines()[-3:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", action="append", default=[], help="only entries whose name contains this (repeatable)")
    parser.add_argument("--skip-slow", action="store_true", help="leave out entries marked slow")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument("--no-baseline", action="store_true", help="do not first run the tests unmutated")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test run (default 900)")
    parser.add_argument("--show", action="store_true", help="print how each killed mutation's tests failed")
    args = parser.parse_args(argv)

    mutations = [m for m in load_table()
                 if (not args.k or any(k in m.name for k in args.k)) and not (args.skip_slow and m.slow)]
    if args.list:
        for m in mutations:
            print(f"{m.name:34} {m.file:28} {'slow ' if m.slow else ''}{m.description}")
        return 0
    stale = stale_entries(mutations, ROOT)
    if stale:
        print("the mutation table is stale; fix these entries (the code moved or changed):", file=sys.stderr)
        for line in stale:
            print(f"  {line}", file=sys.stderr)
        return 2
    if not mutations:
        print("no mutation selected", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="tartflow-mutations-") as tmp:
        copy = Path(tmp) / "tree"
        shutil.copytree(ROOT, copy, ignore=_IGNORED, symlinks=True)
        if not args.no_baseline:
            wanted = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
            outcome, seconds, tail = run_tests(copy, wanted, args.timeout * 2)
            print(f"baseline (unmutated, {len(wanted)} test targets): {outcome} in {seconds:.0f} s", flush=True)
            if outcome != "passed":
                print(tail, file=sys.stderr)
                print("the tests fail without any mutation: fix that first (or rerun if it was load)", file=sys.stderr)
                return 2
        survivors: list[Mutation] = []
        for m in mutations:
            target = copy / m.file
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new, 1))
            try:
                outcome, seconds, tail = run_tests(copy, m.tests, args.timeout)
            finally:
                target.write_text(original)
            if outcome == "passed":
                survivors.append(m)
                verdict = "SURVIVED"
            elif outcome == "no tests":
                survivors.append(m)
                verdict = "SURVIVED (no test ran: check the node ids)"
            else:
                verdict = "killed" if outcome == "failed" else "killed (timeout)"
            print(f"{verdict:9} {m.name:34} {seconds:5.0f} s  {m.description}", flush=True)
            if args.show and outcome != "passed":
                print("    " + "\n    ".join(_failure_lines(tail)), flush=True)
        print(f"\n{len(mutations) - len(survivors)} of {len(mutations)} mutations killed")
        if survivors:
            print("survivors (safety properties no test pins):")
            for m in survivors:
                print(f"  {m.name} ({m.source}): {m.file}: {m.description}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
