"""Running and measuring commands: a launcher interpreter spawns and reaps each one, so wall
time, CPU (user+sys of it and its reaped descendants) and peak RSS are its own; and the CPU the
registry and the Prefect server use meanwhile, read from /proc on Linux."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError
from tests.support.proctree import tree_cpu


@dataclass
class Run:
    """One measured command (or batch of commands started together)."""

    seconds: float
    cpu: float  # user+sys of the child(ren) and the descendants they reaped
    sys: float  # the kernel's share of cpu
    rss: int  # bytes, peak resident set of the main child (the largest child for a batch)
    registry_cpu: float | None = None
    prefect_cpu: float | None = None
    other_cpu: float | None = None  # everything else the machine ran meanwhile (noise indicator)


def _maxrss_bytes(ru_maxrss: int) -> int:
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024


def _machine_busy() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), else None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _tree_cpu(pid: int | None) -> float | None:
    """CPU seconds used so far by ``pid`` and its live descendants (Linux /proc), else None."""
    return None if pid is None else tree_cpu(pid)


#: Runs commands for the benchmark and reports their rusage. It is a fresh, small interpreter
#: (-I -S: no site, nothing imported but the standard library) because Linux carries the RSS of
#: whatever a process was before exec into its ru_maxrss: spawned straight from the benchmark,
#: every child's peak RSS would be at least the benchmark's own. posix_spawn clones with
#: CLONE_VM, so the floor is this launcher's few MB (measured and printed in the header).
LAUNCHER = r'''
import json, os, sys, time
with open(sys.argv[1]) as f:
    spec = json.load(f)
started = time.perf_counter()
pids = [os.posix_spawnp(cmd[0], cmd, os.environ) for cmd in spec["cmds"]]
children = []
for pid in pids:
    _, status, ru = os.wait4(pid, 0)
    children.append({"code": os.waitstatus_to_exitcode(status), "cpu": ru.ru_utime + ru.ru_stime,
                     "sys": ru.ru_stime, "maxrss": ru.ru_maxrss})
result = {"seconds": time.perf_counter() - started, "children": children}
with open(spec["result"] + ".tmp", "w") as f:
    json.dump(result, f)
os.replace(spec["result"] + ".tmp", spec["result"])
'''


@dataclass
class Job:
    """One launcher and the commands it runs; its process group holds them all."""

    proc: subprocess.Popen[bytes]
    result: Path
    log_path: Path


class Children:
    """Every process the benchmark measures, each batch run by a launcher in its own session (so
    a Ctrl+C reaches only the benchmark, which then ends them): :meth:`kill_all` SIGKILLs every
    launcher's process group that is left."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd  # neutral: ``python -m`` puts the cwd first on sys.path
        self.live: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._count = 0
        self.server_pids: list[int | None] = [None, None]  # registry, prefect server

    def start(self, cmds: Sequence[Sequence[str]], env: dict[str, str], log_path: Path) -> Job:
        self._count += 1
        spec = self.cwd / f"job-{self._count}.json"
        result = spec.with_suffix(".result")
        spec.write_text(json.dumps({"cmds": [list(c) for c in cmds], "result": str(result)}))
        with open(log_path, "ab") as out:
            out.write("".join(f"$ {shlex.join(cmd)}\n" for cmd in cmds).encode())
            out.flush()
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(spec)], env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.cwd)
        job = Job(proc, result, log_path)
        with self._lock:
            self.live[proc.pid] = job
        return job

    def reap(self, job: Job, *, block: bool = True) -> dict[str, Any] | None:
        """The launcher's report once it has ended; None if it has not yet (``block=False``).
        Raises BenchError when it ended without one (killed, or a command could not start)."""
        pid, status, _ = os.wait4(job.proc.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return None
        with self._lock:
            job.proc.returncode = os.waitstatus_to_exitcode(status)
            self.live.pop(job.proc.pid, None)
        try:
            report: dict[str, Any] = json.loads(job.result.read_text())
        except FileNotFoundError:
            raise BenchError(f"the launcher ended with status {job.proc.returncode} and no report; last lines "
                             f"of {job.log_path}:\n{tail(job.log_path)}") from None
        return report

    def kill(self, job: Job) -> None:
        with self._lock:  # never signal a group whose leader was reaped (its pid could be reused)
            if job.proc.pid in self.live:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(job.proc.pid, signal.SIGKILL)

    def kill_all(self) -> None:
        for job in list(self.live.values()):
            self.kill(job)
            with contextlib.suppress(ChildProcessError, BenchError):
                self.reap(job)

    def measure(self, cmds: Sequence[Sequence[str]], env: dict[str, str], log_path: Path,
                timeout: float, what: str) -> tuple[Run, list[int]]:
        """Start ``cmds`` together, wait for all; raises BenchError on a timeout."""
        os.sync()  # dirty pages of the previous command are not this one's to write back
        registry0, prefect0 = (_tree_cpu(pid) for pid in self.server_pids)
        busy0 = _machine_busy()
        job = self.start(cmds, env, log_path)
        fired = threading.Event()

        def expire() -> None:
            fired.set()
            self.kill(job)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            report = self.reap(job)
        except BenchError:
            if fired.is_set():
                raise BenchError(f"{what} took longer than {timeout:.0f} s and was killed (log: {log_path})") from None
            raise
        finally:
            timer.cancel()
        assert report is not None
        busy = _delta(busy0, _machine_busy())
        registry1, prefect1 = (_tree_cpu(pid) for pid in self.server_pids)
        children = report["children"]
        cpu = sum(c["cpu"] for c in children)
        rss = max(_maxrss_bytes(c["maxrss"]) for c in children)
        run = Run(report["seconds"], cpu, sum(c["sys"] for c in children), rss,
                  _delta(registry0, registry1), _delta(prefect0, prefect1))
        if busy is not None and run.registry_cpu is not None and run.prefect_cpu is not None:
            run.other_cpu = max(0.0, busy - cpu - run.registry_cpu - run.prefect_cpu)
        return run, [c["code"] for c in children]


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else max(0.0, after - before)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def check_codes(codes: list[int], what: str, log_path: Path) -> None:
    bad = [code for code in codes if code != 0]
    if bad:
        raise BenchError(f"{what} exited with status {bad[0]}; last lines of {log_path}:\n{tail(log_path)}")

