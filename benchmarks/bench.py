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
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tartflow import checkpoint
from tests.support.imagebuilder import OCI_MANIFEST, build_and_push, make_disk
from tests.support.prefectserver import PrefectServer, prefect_env
from tests.support.registry import Registry, RegistryStartError, find_registry_binary, start_registry

__all__ = ["main"]

MB = 1_000_000
GiB = 1 << 30
MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Bump when the recipe of the synthetic images changes, so cached images are rebuilt.
RECIPE = 1
UPLOAD_TIME = "2026-05-01T00:00:00Z"  # pinned: the same recipe always gives the same manifest
TAG = "v1"

# Targets from issue 6.
TARGET_SPEED_VS_SKOPEO = 1.25
TARGET_RSS_BYTES = 300 * MB
TARGET_RSS_SPREAD = 0.10
TARGET_REPULL_VS_NOOP = 1.5

NOOP_FLOW = '''\
from prefect import flow


@flow
def noop():
    return 1


if __name__ == "__main__":
    noop()
'''


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why and what to do."""


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- processes --------------------------------------------------------------------------------


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
    if pid is None or not Path("/proc/self/stat").exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        # fields[1] is ppid; utime, stime, cutime, cstime are fields 14-17 of stat (1-based).
        stats[int(entry.name)] = (int(fields[1]), sum(int(v) for v in fields[11:15]) / tick)
    wanted, total, frontier = set(), 0.0, [pid]
    while frontier:
        current = frontier.pop()
        if current in wanted or current not in stats:
            continue
        wanted.add(current)
        total += stats[current][1]
        frontier.extend(child for child, (ppid, _) in stats.items() if ppid == current)
    return total if wanted else None


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
                             f"of {job.log_path}:\n{_tail(job.log_path)}") from None
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


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _check_codes(codes: list[int], what: str, log_path: Path) -> None:
    bad = [code for code in codes if code != 0]
    if bad:
        raise BenchError(f"{what} exited with status {bad[0]}; last lines of {log_path}:\n{_tail(log_path)}")


# --- images -----------------------------------------------------------------------------------


@dataclass
class Image:
    """A synthetic Tart image in the benchmark's registry (cached across runs as JSON)."""

    name: str
    repository: str
    tag: str
    disk_size: int
    layer_size: int
    manifest_digest: str
    blobs: list[dict[str, Any]]  # config stub first, then the layers: mediaType, digest, size
    build_seconds: float = 0.0

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.blobs[1:]

    @property
    def all_bytes(self) -> int:
        """What skopeo and curl fetch: the config stub and every layer."""
        return sum(int(b["size"]) for b in self.blobs)

    @property
    def layer_bytes(self) -> int:
        """What tartflow fetches: the layers (Tart's real VM config is a layer, not the stub)."""
        return sum(int(b["size"]) for b in self.layers)

    def disk_layers(self) -> int:
        return sum(1 for b in self.layers if b["mediaType"].endswith(".disk.v2"))


def image_name(disk_gib: float, layer_mib: int) -> str:
    return f"disk{disk_gib:g}g-layer{layer_mib}m-r{RECIPE}".replace(".", "p")


def _has_image(registry: Registry, image: Image) -> bool:
    base = f"{registry.url}/v2/{image.repository}"
    with httpx.Client(timeout=10) as client:
        got = client.get(f"{base}/manifests/{image.tag}", headers={"Accept": OCI_MANIFEST})
        if got.status_code != 200 or got.headers.get("Docker-Content-Digest") != image.manifest_digest:
            return False
        for blob in image.blobs:
            head = client.head(f"{base}/blobs/{blob['digest']}")
            if head.status_code != 200 or int(head.headers.get("Content-Length", -1)) != int(blob["size"]):
                return False
    return True


def ensure_image(registry: Registry, workdir: Path, disk_gib: float, layer_mib: int) -> Image:
    """The image of ``disk_gib`` GiB in ``layer_mib`` MiB layers: cached, or built and pushed now."""
    name = image_name(disk_gib, layer_mib)
    meta = workdir / "images" / f"{name}.json"
    if meta.exists():
        image = Image(**json.loads(meta.read_text()))
        if _has_image(registry, image):
            return image
        log(f"image {name}: the registry no longer holds all of it; building it again")
    disk_size, layer_size = int(disk_gib * GiB), layer_mib * MiB
    free = shutil.disk_usage(workdir).free
    if free < 2.2 * disk_size:
        raise BenchError(f"building {name} needs about {2.2 * disk_size / 1e9:.1f} GB free under {workdir}; "
                         f"{free / 1e9:.1f} GB is")
    scratch = workdir / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    disk = scratch / f"{name}.img"
    log(f"image {name}: writing a {disk_size / GiB:g} GiB disk and pushing it (once; cached in {workdir})")
    started = time.monotonic()
    try:
        make_disk(disk, disk_size, seed=zlib.crc32(name.encode()), pattern="mixed")
        built = build_and_push(registry.url, f"bench/{name}", TAG, disk, layer_size=layer_size,
                               upload_time=UPLOAD_TIME)
    finally:
        disk.unlink(missing_ok=True)
    config = built.manifest["config"]
    blobs = [{k: d[k] for k in ("mediaType", "digest", "size")} for d in [config, *built.layers]]
    image = Image(name, built.repository, built.tag, disk_size, layer_size, built.manifest_digest, blobs,
                  round(time.monotonic() - started, 1))
    tmp = meta.with_suffix(".tmp")
    meta.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(asdict(image), indent=2) + "\n")
    tmp.replace(meta)
    log(f"image {name}: {len(blobs)} blobs, {image.all_bytes / MB:.0f} MB compressed, "
        f"built in {image.build_seconds:.0f} s")
    return image


# --- the environment --------------------------------------------------------------------------


def _first_line(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "?"


def machine_lines(source: str) -> list[str]:
    if sys.platform == "darwin":
        cpu = _first_line(["sysctl", "-n", "machdep.cpu.brand_string"])
        ram = int(_first_line(["sysctl", "-n", "hw.memsize"]) or 0)
    else:
        cpu, ram = "?", 0
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith(("model name", "Model", "cpu model")):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) * 1024
    versions = [
        f"tartflow {importlib.metadata.version('tartflow')} ({source})",
        f"prefect {importlib.metadata.version('prefect')}",
        f"httpx {importlib.metadata.version('httpx')}",
        f"lz4 {importlib.metadata.version('lz4')}",
    ]
    return [
        f"machine:  {cpu}; {os.cpu_count()} cores; {ram / GiB:.1f} GiB RAM; {platform.platform()}",
        f"python:   {platform.python_version()} ({sys.executable})",
        f"software: {'; '.join(versions)}",
        f"tools:    {_first_line(['skopeo', '--version'])}; {' '.join(_first_line(['curl', '--version']).split()[:2])}; "
        f"{_first_line([find_registry_binary(), '--version'])}",
    ]


def check_tools() -> str:
    """The tartflow console script; BenchError naming what to install when a tool is missing."""
    missing = [tool for tool in ("skopeo", "curl") if shutil.which(tool) is None]
    try:
        find_registry_binary()
    except RegistryStartError as exc:
        missing.append(f"docker-registry ({exc})")
    if missing:
        raise BenchError("missing: " + ", ".join(missing) + " (Debian: apt-get install skopeo curl docker-registry)")
    script = Path(sys.executable).with_name("tartflow")
    if not script.exists():
        raise BenchError(f"no tartflow console script beside {sys.executable}: run `pip install -e .` in this venv")
    return str(script)


# --- the benchmark ----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, run: Run) -> Run:
        self.runs.setdefault(key, []).append(run)
        return run


class Bench:
    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.stack = stack
        self.results = Results()
        self.workdir = Path(args.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        script = check_tools()
        self.run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=self.workdir))
        if not args.keep_run_dir:
            stack.callback(shutil.rmtree, self.run_dir, ignore_errors=True)
        self.children = Children(self.run_dir)
        stack.callback(self.children.kill_all)
        self.pythonpath: str | None = None
        if args.rev:
            self.pythonpath = str(self.snapshot(args.rev))
            # The command moved from tartflow/cli.py to flows/cli.py; older revisions have the former.
            cli = "flows.cli" if (Path(self.pythonpath) / "flows" / "cli.py").exists() else "tartflow.cli"
            self.tartflow = [sys.executable, "-m", cli]
        else:
            self.tartflow = [script]
        self.logs = self.run_dir / "logs"
        self.logs.mkdir()
        self.homes = 0
        self.timeout = max(600.0, 240.0 * args.disk_gib)
        self.commands: dict[str, str] = {}

    # -- set-up --
    def snapshot(self, rev: str) -> Path:
        """The committed product code at ``rev`` (git archive, byte-compiled), untouched by edits in progress."""
        dest = self.run_dir / "src"
        dest.mkdir()
        resolved = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                                  capture_output=True, text=True, check=False)
        if resolved.returncode != 0:
            raise BenchError(f"{rev!r} is not a commit of {REPO_ROOT}: {resolved.stderr.strip()}")
        self.commit = resolved.stdout.strip()  # fixed now: commits made during the run change nothing
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", self.commit,
                                  "tartflow", "flows", "tasks"], capture_output=True, check=False)
        if archive.returncode != 0:
            raise BenchError(f"git archive {rev} failed: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        # Byte-compiled once, as `pip install` does: with PYTHONDONTWRITEBYTECODE set (as on this
        # machine) every run would otherwise compile the snapshot's sources again (~0.15 s).
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest)], check=True, stdout=subprocess.DEVNULL)
        return dest

    def source(self) -> str:
        """Which tartflow code is measured, for the header."""
        git = ["git", "-C", str(REPO_ROOT)]
        if self.args.rev:
            return (f"committed code of {self.args.rev} = {self.commit[:12]}, "
                    f"via PYTHONPATH=<git archive snapshot> python -m {self.tartflow[-1]}")
        head = _first_line([*git, "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "tartflow", "flows", "tasks"],
                               capture_output=True, text=True, check=False).stdout.splitlines()
        state = f"{len(dirty)} uncommitted change(s) in tartflow/ flows/ tasks/" if dirty else "clean"
        return f"working tree of {REPO_ROOT} at {head}, {state}"

    def start_services(self) -> None:
        floor, _ = self.children.measure([["true"]], dict(os.environ), self.logs / "floor.log", 60, "true")
        self.results.notes["rss_floor"] = floor.rss
        self.registry = start_registry(self.workdir / "registry")
        self.stack.callback(self.registry.stop)
        self.children.server_pids[0] = self.registry.process.pid
        sizes = sorted({self.args.disk_gib, *self.rss_sizes()})
        self.images = {gib: ensure_image(self.registry, self.workdir, gib, self.args.layer_mib) for gib in sizes}
        self.image = self.images[self.args.disk_gib]
        home = self.run_dir / "prefect-server"
        home.mkdir()
        log("starting prefect server")
        try:
            self.prefect = PrefectServer(home)
        except RuntimeError as exc:
            raise BenchError(f"could not start `prefect server start`: {exc}") from None
        self.stack.callback(self.prefect.stop)
        self.children.server_pids[1] = getattr(getattr(self.prefect, "_proc", None), "pid", None)
        self.prefect_home = self.run_dir / "prefect-client"
        self.prefect_home.mkdir()
        self.noop = self.run_dir / "noop_flow.py"
        self.noop.write_text(NOOP_FLOW)
        self.skopeo_policy: list[str] = []
        if not Path("/etc/containers/policy.json").exists():
            policy = self.run_dir / "policy.json"
            policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
            self.skopeo_policy = ["--policy", str(policy)]

    def write_probe(self) -> None:
        """How much a page-cache write costs here: on some VMs, memory the guest has not touched
        lately costs several times more to fill, which weighs on whoever writes the most."""
        path = self.run_dir / "write-probe"
        buf = os.urandom(MiB)
        usage0, started = os.times(), time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(1024):
                f.write(buf)
        seconds, usage1 = time.perf_counter() - started, os.times()
        path.unlink()
        self.results.notes["write_probe"] = {"seconds": round(seconds, 2),
                                             "sys": round(usage1.system - usage0.system, 2)}

    def rss_sizes(self) -> list[float]:
        sizes = [float(s) for s in self.args.rss_sizes.split(",") if s.strip()]
        return [s for s in sizes if not (self.args.skip_8gib and s >= 8)]

    def env(self, tart_home: Path | None = None) -> dict[str, str]:
        env = prefect_env(self.prefect_home, self.prefect.api_url)
        env.pop("TARTFLOW_HOME", None)
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        if tart_home is not None:
            env["TART_HOME"] = str(tart_home)
        return env

    def fresh_home(self, label: str) -> Path:
        self.homes += 1
        home = self.run_dir / f"tart-{self.homes:02d}-{label}"
        home.mkdir()
        return home

    # -- the commands --
    def ref(self, image: Image) -> str:
        return f"{self.registry.host}/{image.repository}:{image.tag}"

    def pull_cmd(self, image: Image) -> list[str]:
        extra = ["--concurrency", str(self.args.concurrency)] if self.args.concurrency else []
        return [*self.tartflow, "pull", "--insecure", self.ref(image), *extra]

    def pull(self, image: Image, home: Path, what: str) -> Run:
        log_path = self.logs / f"{home.name}.log"
        run, codes = self.children.measure([self.pull_cmd(image)], self.env(home), log_path, self.timeout, what)
        _check_codes(codes, what, log_path)
        self.verify_pull(image, home)
        return run

    def verify_pull(self, image: Image, home: Path) -> None:
        tag = home / "cache" / "OCIs" / self.registry.host.replace(":", "%3A") / image.repository / image.tag
        target = tag.resolve()
        disk = target / "disk.img"
        if target.name != image.manifest_digest or not disk.exists():
            raise BenchError(f"tartflow exited 0 but {tag} does not point at a VM {image.manifest_digest}")
        if disk.stat().st_size != image.disk_size:
            raise BenchError(f"{disk} is {disk.stat().st_size} bytes, the image's disk is {image.disk_size}")

    def cold_pull(self, image: Image, label: str, *, keep: bool = False) -> tuple[Run, Path]:
        home = self.fresh_home(label)
        run = self.pull(image, home, f"cold tartflow pull of {image.name}")
        if not keep:
            shutil.rmtree(home)
        return run, home

    def skopeo(self) -> Run:
        dest = self.run_dir / "skopeo-dir"
        cmd = ["skopeo", *self.skopeo_policy, "copy", "--src-tls-verify=false",
               f"docker://{self.ref(self.image)}", f"dir:{dest}"]
        log_path = self.logs / "skopeo.log"
        run, codes = self.children.measure([cmd], self.env(), log_path, self.timeout, "skopeo copy")
        _check_codes(codes, "skopeo copy", log_path)
        for blob in self.image.blobs:
            path = dest / blob["digest"].split(":", 1)[1]
            if not path.exists() or path.stat().st_size != int(blob["size"]):
                raise BenchError(f"skopeo copy exited 0 but {path} is missing or has the wrong size")
        shutil.rmtree(dest)
        return run

    def curl_cmds(self, dest: Path) -> list[list[str]]:
        base = f"{self.registry.url}/v2/{self.image.repository}/blobs"
        return [["curl", "-sS", "--fail", "-L", "-o", str(dest / b["digest"].split(":", 1)[1]), f"{base}/{b['digest']}"]
                for b in self.image.blobs]

    def curl(self) -> Run:
        dest = self.run_dir / "curl-dir"
        dest.mkdir()
        log_path = self.logs / "curl.log"
        run, codes = self.children.measure(self.curl_cmds(dest), self.env(), log_path, self.timeout, "curl")
        _check_codes(codes, "curl", log_path)
        for blob in self.image.blobs:
            path = dest / blob["digest"].split(":", 1)[1]
            if path.stat().st_size != int(blob["size"]):
                raise BenchError(f"curl fetched {path.stat().st_size} bytes of {blob['digest']}, not {blob['size']}")
        shutil.rmtree(dest)
        return run

    def noop_flow(self) -> Run:
        cmd = [sys.executable, str(self.noop)]
        log_path = self.logs / "noop.log"
        run, codes = self.children.measure([cmd], self.env(), log_path, 300, "Prefect's minimal flow")
        _check_codes(codes, "Prefect's minimal flow", log_path)
        return run

    # -- the phases --
    def main_rounds(self) -> Path:
        """A B C alternated; returns the TART_HOME of the last cold pull, kept for re-pulls."""
        rounds = self.args.rounds
        self.results.notes["load_before"] = f"{os.getloadavg()[0]:.2f}"
        self.write_probe()
        log("warm-up: one untimed curl fetch of every blob")
        self.results.notes["warmup_s"] = round(self.curl().seconds, 2)
        last_home = None
        for i in range(1, rounds + 1):
            run, last_home = self.cold_pull(self.image, f"cold{i}", keep=i == rounds)
            self.results.add("A", run)
            log(f"round {i}/{rounds}: A tartflow pull {run.seconds:6.1f} s")
            run = self.results.add("B", self.skopeo())
            log(f"round {i}/{rounds}: B skopeo copy   {run.seconds:6.1f} s")
            run = self.results.add("C", self.curl())
            log(f"round {i}/{rounds}: C curl (limit)  {run.seconds:6.1f} s")
        assert last_home is not None
        return last_home

    def repull_rounds(self, home: Path) -> None:
        for i in range(1, self.args.rounds + 1):
            run = self.results.add("repull", self.pull(self.image, home, "re-pull of a cached image"))
            noop = self.results.add("noop", self.noop_flow())
            log(f"round {i}/{self.args.rounds}: re-pull {run.seconds:5.2f} s, minimal flow {noop.seconds:5.2f} s")
        shutil.rmtree(home)

    def resume_rounds(self) -> None:
        for i in range(1, self.args.rounds + 1):
            home = self.fresh_home(f"killed{i}")
            killed_after, fraction = self.kill_at_half(home)
            run = self.results.add("resume", self.pull(self.image, home, "tartflow pull after a kill at 50 %"))
            self.results.notes.setdefault("kills", []).append(
                {"killed_after_s": round(killed_after, 2), "on_disk_fraction": round(fraction, 3)})
            log(f"round {i}/{self.args.rounds}: killed after {killed_after:.1f} s with {fraction:.0%} on disk; "
                f"finished in {run.seconds:.1f} s")
            shutil.rmtree(home)

    def kill_at_half(self, home: Path) -> tuple[float, float]:
        """Start a cold pull and SIGKILL it once half the compressed bytes are on disk."""
        store = home / "tartflow"
        target = self.image.layer_bytes / 2
        log_path = self.logs / f"{home.name}-killed.log"
        os.sync()
        started = time.perf_counter()
        job = self.children.start([self.pull_cmd(self.image)], self.env(home), log_path)
        while True:
            if self.children.reap(job, block=False) is not None:
                raise BenchError(f"the pull to be killed ended before half of it was on disk; last lines of "
                                 f"{log_path}:\n{_tail(log_path)}")
            if _bytes_under(store, self.image) >= target:
                self.children.kill(job)  # SIGKILL to the launcher's group: tartflow and all it runs
                with contextlib.suppress(BenchError):
                    self.children.reap(job)
                break
            if time.perf_counter() - started > self.timeout:
                self.children.kill(job)
                raise BenchError(f"the pull to be killed never got half its bytes on disk (log: {log_path})")
            time.sleep(0.01)
        return time.perf_counter() - started, _bytes_under(store, self.image) / self.image.layer_bytes

    def rss_rounds(self) -> None:
        for gib in self.rss_sizes():
            image = self.images[gib]
            run, _ = self.cold_pull(image, f"rss{gib:g}g")
            self.results.add(f"rss{gib:g}", run)
            log(f"RSS at {gib:g} GiB: {run.rss / MB:.0f} MB peak, {run.seconds:.1f} s")

    def run(self) -> int:
        self.start_services()
        self.commands = {
            "A": shlex.join(self.pull_cmd(self.image)) + "  (TART_HOME fresh and empty, TARTFLOW_HOME unset)",
            "B": shlex.join(["skopeo", *self.skopeo_policy, "copy", "--src-tls-verify=false",
                             f"docker://{self.ref(self.image)}"]) + " dir:<tmpdir>",
            "C": f"{len(self.image.blobs)} x curl -sS --fail -L -o <file> {self.registry.url}/v2/"
                 f"{self.image.repository}/blobs/<digest>  (all started at once)",
            "noop": f"{sys.executable} noop_flow.py  (@flow def noop(): return 1; noop())",
        }
        last_home = self.main_rounds()
        self.repull_rounds(last_home)
        self.resume_rounds()
        self.rss_rounds()
        report = Report(self).text()
        print(report, flush=True)
        self.save(report)
        return 0

    def save(self, report: str) -> None:
        out = self.workdir / "results"
        out.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (out / f"{stamp}.txt").write_text(report + "\n")
        raw = {"argv": sys.argv, "image": asdict(self.image), "notes": self.results.notes,
               "runs": {k: [asdict(r) for r in v] for k, v in self.results.runs.items()}}
        (out / f"{stamp}.json").write_text(json.dumps(raw, indent=2) + "\n")
        log(f"saved {out / stamp}.txt and .json")


def _bytes_under(store: Path, image: Image) -> int:
    """Compressed bytes of ``image`` a pull has kept: partials and blobs in the store, plus the
    blobs of disk layers already decoded into the staging VM (their compressed bytes are
    dropped at that point), plus what the checkpoints of layers being decoded on the way in
    vouch for (their compressed bytes are not kept)."""
    total = 0
    for sub in ("ingest", "blobs"):
        for root, _, files in os.walk(store / sub):
            for name in files:
                with contextlib.suppress(FileNotFoundError):  # renamed from ingest/ to blobs/
                    total += os.stat(os.path.join(root, name)).st_size
    disk = [b for b in image.layers if b["mediaType"].endswith(".disk.v2")]
    state = store / "staging" / (image.manifest_digest.split(":")[1] + ".state")
    for i, layer in enumerate(disk):
        if (state / f"layer-{i}.done").exists():
            total += int(layer["size"])
            continue
        found = checkpoint.newest(state.glob(f"layer-{i}.checkpoint-*"), layer["digest"])
        total += found[1].received if found else 0
    return total


# --- the report -------------------------------------------------------------------------------


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


# --- command line -----------------------------------------------------------------------------


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
