"""The report: machine, exact commands, medians, and PASS/FAIL against issue 6's targets."""

from __future__ import annotations

import os
import shlex
import statistics
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from benchmarks.common import MB, REPO_ROOT, GiB, MiB
from benchmarks.images import machine_lines
from benchmarks.processes import Run

if TYPE_CHECKING:
    from benchmarks.runner import Bench

# Targets from issue 6.
TARGET_SPEED_VS_SKOPEO = 1.25
TARGET_RSS_BYTES = 300 * MB
TARGET_RSS_SPREAD = 0.10
TARGET_REPULL_VS_NOOP = 1.5


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _med(runs: list[Run], attr: str) -> float | None:
    values = [getattr(r, attr) for r in runs]
    return None if not values or any(v is None for v in values) else median(values)


class Report:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.runs = bench.results.runs
        self.lines: list[str] = []
        self.targets: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def text(self) -> str:
        self.header()
        self.main_table()
        self.repull()
        self.resume()
        self.rss()
        self.add("", "targets (issue 6), from the figures above", *self.targets)
        return "\n".join(self.lines)

    def header(self) -> None:
        b, image = self.bench, self.bench.image
        argv = shlex.join([sys.executable, "-m", "benchmarks.bench", *sys.argv[1:]])
        self.add("tartflow benchmark (issue 6)", f"command:  cd {REPO_ROOT} && {argv}", *machine_lines(b.source()))
        self.add(
            f"image:    {b.ref(image)}  {image.disk_size / GiB:g} GiB disk, {len(image.blobs)} blobs "
            f"({image.disk_layers()} disk layers of {image.layer_size // MiB} MiB), {image.all_bytes / MB:.0f} MB "
            f"compressed ({image.all_bytes / image.disk_size:.0%} of the disk); built once in {image.build_seconds:.0f} s",
            f"servers:  registry {b.registry.url} (storage {b.workdir / 'registry'}); "
            f"one prefect server, PREFECT_API_URL={b.prefect.api_url}",
            f"rss:      ru_maxrss of each command, measured by a small launcher: nothing reads below its floor "
            f"of {b.results.notes['rss_floor'] / MB:.0f} MB (what `true` shows)",
            f"probe:    writing 1 GiB to a new file here took {b.results.notes['write_probe']['seconds']:.2f} s "
            f"({b.results.notes['write_probe']['sys']:.2f} s sys) before the timed runs",
            f"load:     1-min load average {b.results.notes.get('load_before', '?')} before the timed runs, "
            f"{os.getloadavg()[0]:.2f} at the end",
            f"method:   untimed warm-up fetch of every blob ({b.results.notes.get('warmup_s', 0):.1f} s), then "
            f"A B C x {b.args.rounds}; `sync` before each timed command; medians; MB = 10^6 bytes",
            "commands:",
            *(f"  {key:<5}{cmd}" for key, cmd in b.commands.items()),
        )

    def main_table(self) -> None:
        image = self.bench.image
        self.add("", f"cold pull of {image.disk_size / GiB:g} GiB, {self.bench.args.rounds} round(s) alternating A B C",
                 f"{'':<34}{'wall s':>8}{'MB/s':>8}{'CPU s':>8}{'sys':>6}{'RSS MB':>8}{'reg CPU':>9}{'pfx CPU':>9}{'other':>7}  each round (s)")
        rows = [("A", "A tartflow pull", image.layer_bytes), ("B", "B skopeo copy (fetch+verify)", image.all_bytes),
                ("C", f"C curl x{len(image.blobs)} parallel (limit)", image.all_bytes)]
        for key, label, size in rows:
            runs = self.runs[key]
            wall = median([r.seconds for r in runs])
            self.add(f"{label:<34}{wall:>8.2f}{size / MB / wall:>8.0f}{_fmt(_med(runs, 'cpu'), '.1f'):>8}{_fmt(_med(runs, 'sys'), '.1f'):>6}"
                     f"{median([r.rss for r in runs]) / MB:>8.0f}{_fmt(_med(runs, 'registry_cpu'), '.1f'):>9}"
                     f"{_fmt(_med(runs, 'prefect_cpu'), '.1f'):>9}{_fmt(_med(runs, 'other_cpu'), '.1f'):>7}  {' '.join(f'{r.seconds:.2f}' for r in runs)}")
        a, b, c = (median([r.seconds for r in self.runs[k]]) for k in "ABC")
        speed_vs_skopeo = (image.layer_bytes / a) / (image.all_bytes / b)
        self.add("(CPU s: user+sys of the command and its children, sys: the kernel's part. RSS: peak of the main process; for C the largest curl. "
                 "reg/pfx/other: CPU s used meanwhile by the registry, the Prefect server and anything else on the "
                 "machine; other > 0 means noise)",
                 f"tartflow speed / skopeo speed: {speed_vs_skopeo:.2f}x",
                 f"tartflow speed / raw limit:    {(image.layer_bytes / a) / (image.all_bytes / c):.2f}x")
        self.target(speed_vs_skopeo >= TARGET_SPEED_VS_SKOPEO,
                    f"cold pull >= {TARGET_SPEED_VS_SKOPEO}x skopeo's speed: {speed_vs_skopeo:.2f}x")

    def repull(self) -> None:
        r, n = (median([x.seconds for x in self.runs[k]]) for k in ("repull", "noop"))
        ratio = r / n
        self.add("", "re-pull of the cached image vs Prefect's minimal flow run (same PREFECT_API_URL)",
                 f"  tartflow pull (cached)   {r:6.2f} s  CPU {_med(self.runs['repull'], 'cpu') or 0:.1f} s   "
                 f"rounds {' '.join(f'{x.seconds:.2f}' for x in self.runs['repull'])}",
                 f"  minimal Prefect flow     {n:6.2f} s  CPU {_med(self.runs['noop'], 'cpu') or 0:.1f} s   "
                 f"rounds {' '.join(f'{x.seconds:.2f}' for x in self.runs['noop'])}",
                 f"  ratio {ratio:.2f}x")
        self.target(ratio <= TARGET_REPULL_VS_NOOP, f"re-pull <= {TARGET_REPULL_VS_NOOP}x Prefect's minimal flow run: {ratio:.2f}x")

    def resume(self) -> None:
        kills = self.bench.results.notes.get("kills", [])
        resume, cold = (median([x.seconds for x in self.runs[k]]) for k in ("resume", "A"))
        self.add("", "finishing a pull SIGKILLed at 50 % vs a cold pull",
                 "  killed at " + ", ".join(f"{k['on_disk_fraction']:.0%} after {k['killed_after_s']:.1f} s" for k in kills),
                 f"  second invocation to completion {resume:6.2f} s  (rounds "
                 f"{' '.join(f'{x.seconds:.2f}' for x in self.runs['resume'])})",
                 f"  cold pull                       {cold:6.2f} s  -> {resume / cold:.0%} of a cold pull")

    def rss(self) -> None:
        sizes = self.bench.rss_sizes()
        self.add("", "peak RSS of a cold tartflow pull by disk size")
        measured: dict[float, int] = {}
        for gib in sizes:
            run = self.runs[f"rss{gib:g}"][0]
            measured[gib] = run.rss
            self.add(f"  {gib:>4g} GiB disk  {run.rss / MB:6.0f} MB  ({run.seconds:.1f} s)")
        main_rss = max(r.rss for r in self.runs["A"])
        self.add(f"  {self.bench.args.disk_gib:>4g} GiB disk  {main_rss / MB:6.0f} MB  (largest of the A rounds)")
        peak = max([main_rss, *measured.values()])
        self.target(peak <= TARGET_RSS_BYTES, f"peak RSS <= {TARGET_RSS_BYTES / MB:.0f} MB: {peak / MB:.0f} MB (largest measured)")
        if len(measured) >= 2:
            small, large = min(measured), max(measured)
            ratio = measured[large] / measured[small]
            self.add(f"  ratio {large:g} GiB / {small:g} GiB: {ratio:.2f}")
            self.target(abs(ratio - 1) <= TARGET_RSS_SPREAD,
                        f"peak RSS within {TARGET_RSS_SPREAD:.0%} between {small:g} GiB and {large:g} GiB: {ratio - 1:+.1%}")
        else:
            self.targets.append(f"SKIP  peak RSS within {TARGET_RSS_SPREAD:.0%} between 1 GiB and 8 GiB: "
                                "not measured (needs two --rss-sizes; 8 GiB skipped?)")

    def target(self, ok: bool, text: str) -> None:
        self.targets.append(f"{'PASS' if ok else 'FAIL'}  {text}")


