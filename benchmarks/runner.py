"""The benchmark itself: cold pulls against skopeo and curl, re-pull against a minimal Prefect
flow, resume after SIGKILL, peak RSS; every figure measured, none assumed."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import MB, REPO_ROOT, BenchError, MiB, log
from benchmarks.images import Image, check_tools, ensure_image, first_line
from benchmarks.processes import Children, Run, check_codes, tail
from benchmarks.report import Report
from tartflow import checkpoint
from tests.support.prefectserver import PrefectServer, prefect_env
from tests.support.registry import start_registry

NOOP_FLOW = '''\
from prefect import flow


@flow
def noop():
    return 1


if __name__ == "__main__":
    noop()
'''


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
        head = first_line([*git, "rev-parse", "--short", "HEAD"])
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
        check_codes(codes, what, log_path)
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
        check_codes(codes, "skopeo copy", log_path)
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
        check_codes(codes, "curl", log_path)
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
        check_codes(codes, "Prefect's minimal flow", log_path)
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
                                 f"{log_path}:\n{tail(log_path)}")
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

