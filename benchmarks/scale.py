"""What one Prefect server carries: cost per pull and N runners at once, on PostgreSQL and SQLite.

    python -m benchmarks.scale [--layers 16,64,200] [--runners 4,16,32] [--databases postgres,sqlite]

Starts a ``docker-registry`` and, per database, a ``prefect server`` (PostgreSQL started on
loopback by tests/support/postgres.py), pushes images of tiny distinct layers (the server's
cost depends on the layer count, not the bytes), then measures:

1. cost per pull, one runner alone, per image: task runs and flow runs (read back from the
   API), HTTP API requests (uvicorn's access log), server and database CPU seconds
   (/proc of their process trees), rows written (pg_stat_user_tables), and the client's
   Prefect overhead: CPU of the pull as a flow minus CPU of the same core steps called
   directly, as a share of the former;
2. waves: N runner processes (own TART_HOME each) pull one small image at the same moment;
   per N: server CPU, client-observed API latency p50/p99, failed or crashed runs (from the
   API), wall time from start to the last finish;
3. idle workers (first database only): API requests per minute of ``prefect worker``s
   polling an empty queue.

SQLite waves stop at ``--sqlite-max-runners`` (16): SQLite already fails there.

Prints one table at the end and writes it, with the raw numbers as JSON, under --out (the
JSON after every measurement); exits 1 when any pull failed or crashed.
Every wave is bounded by ``--timeout``; with the defaults the whole run was about 35 minutes
on a 2-core machine under heavy load (load average 10-20), and should take well under 15 on a
quiet one. Seconds measured on a busy machine are inflated, counts are not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.scale_report import render
from tests.support.fleetsim import CHECKOUT, Counters, ScaleServer, Wave, percentile, run_wave
from tests.support.imagebuilder import BuiltImage, build_and_push, make_disk
from tests.support.postgres import PostgresUnavailable
from tests.support.registry import start_registry


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def push_image(registry_url: str, work: Path, layers: int, layer_kib: int) -> BuiltImage:
    """``scale/l<layers>:v1``: random (so distinct, incompressible) layers of ``layer_kib``."""
    disk = work / f"disk-{layers}.img"
    make_disk(disk, layers * layer_kib * 1024, seed=layers, pattern="random")
    return build_and_push(registry_url, f"scale/l{layers}", "v1", disk, layer_size=layer_kib * 1024)


def check_on_disk(wave: Wave, image: BuiltImage) -> int:
    """Runners whose VM in Tart's cache is not byte for byte the image (counted as failed)."""
    expected = image.disk_path.read_bytes()
    bad = 0
    for runner in wave.runners:
        path = runner.data.get("path")
        if runner.ok and (not path or Path(path, "disk.img").read_bytes() != expected):
            runner.data.update(state="WRONG", error="disk.img differs from the pushed image")
            bad += 1
    return bad


def read_back(server: ScaleServer, wave: Wave) -> dict[str, Any]:
    """Final states and task runs as the server recorded them."""
    ids = wave.flow_run_ids
    states = Counter(server.flow_run_states(ids).values()) if ids else Counter()
    return {"states": dict(states), "task_runs": dict(server.task_runs(ids)) if ids else {}}


def delta_dict(delta: Counters) -> dict[str, Any]:
    by_route: Counter[str] = Counter()
    by_status: Counter[int] = Counter()
    for (method, path, status), count in delta.requests.items():
        by_route[f"{method} {path}"] += count
        by_status[status] += count
    return {"seconds": delta.at, "server_cpu": delta.server_cpu, "db_cpu": delta.db_cpu,
            "requests": delta.request_count, "by_route": dict(by_route.most_common()),
            "by_status": {str(k): v for k, v in sorted(by_status.items())}, "rows": delta.rows,
            "rows_by_table": dict(sorted(delta.rows_by_table.items(), key=lambda kv: -kv[1]))}


def measured(server: ScaleServer, reference: str, homes: list[Path], image: BuiltImage,
             timeout: float) -> dict[str, Any]:
    before = server.counters()
    wave = run_wave(server, reference, homes, timeout=timeout)
    after = server.counters()
    check_on_disk(wave, image)
    latencies = wave.latencies
    failed = [r.data.get("error", r.data.get("state")) for r in wave.runners if not r.ok]
    return {
        "runners": len(homes), "wall": wave.wall, "client_cpu": wave.cpu,
        "client_requests": len(latencies),
        "p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
        "max": latencies[-1] if latencies else None,
        "failed": len(failed), "errors": failed[:5], **read_back(server, wave),
        "server": delta_dict(after.minus(before)),
    }


def core_cpu(server: ScaleServer, image: BuiltImage, work: Path, timeout: float) -> float | None:
    """CPU of the same pull's core steps without Prefect (one runner, no server involved)."""
    wave = run_wave(server, image.reference, [work / f"core-{image.repository.replace('/', '-')}"],
                    mode="core", timeout=timeout)
    return wave.runners[0].data.get("cpu") if wave.runners[0].ok and not check_on_disk(wave, image) else None


def idle_workers(server: ScaleServer, work: Path, count: int, seconds: float) -> dict[str, Any]:
    """``count`` runner workers polling empty queues for ``seconds``: their API requests."""
    with contextlib.suppress(Exception):
        server.api("POST", "/work_pools/", {"name": "mac-runners", "type": "process"})
    procs = []
    for index in range(count):
        home = work / f"idle-{index}"
        env = {**server.client_env(home), "PREFECT_WORKER_QUERY_SECONDS": "10"}
        home.mkdir(parents=True)
        procs.append(subprocess.Popen([sys.executable, "-m", "deployments.fleet", "runner", f"idle-{index}"],
                                      env=env, cwd=CHECKOUT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT))
    try:
        time.sleep(min(30.0, seconds))  # start-up: imports, queue creation, first poll
        before = server.counters(settle=False)
        time.sleep(seconds)
        after = server.counters(settle=False)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    delta = delta_dict(after.minus(before))
    return {"workers": count, **delta,
            "per_worker_per_minute": delta["requests"] / count / (delta["seconds"] / 60)}


def save(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Raw results so far, so an interrupted run keeps what it measured."""
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale.json").write_text(json.dumps(results, indent=1, default=str))


def bench_database(database: str, args: argparse.Namespace, work: Path, images: dict[int, BuiltImage],
                   wave_image: BuiltImage, results: dict[str, Any]) -> dict[str, Any]:
    root = work / database
    log(f"{database}: starting prefect server")
    server = ScaleServer(root, database, server_env=dict(kv.split("=", 1) for kv in args.server_env))
    out: dict[str, Any] = {"database": database, "per_pull": [], "waves": []}
    results["databases"].append(out)
    try:
        server.ensure_egress_limit(args.egress_slots)
        base0 = server.counters()
        time.sleep(args.idle_seconds)
        out["idle"] = delta_dict(server.counters().minus(base0))
        for layers, image in images.items():
            for attempt in range(args.repeat):
                log(f"{database}: one pull of {layers} layers ({attempt + 1}/{args.repeat})")
                row = measured(server, image.reference, [root / f"pull-{layers}-{attempt}"], image, args.timeout)
                row["layers"] = layers
                if database == args.databases[0]:
                    row["core_cpu"] = core_cpu(server, image, root / f"core-{attempt}", args.timeout)
                out["per_pull"].append(row)
                save(args, results)
        for n in args.runners:
            if database == "sqlite" and n > args.sqlite_max_runners:
                log(f"sqlite: wave of {n} runners skipped (--sqlite-max-runners {args.sqlite_max_runners})")
                continue
            log(f"{database}: wave of {n} runners")
            homes = [root / f"wave-{n}" / f"runner-{i}" for i in range(n)]
            row = measured(server, wave_image.reference, homes, wave_image, args.timeout)
            row["layers"] = args.wave_layers
            out["waves"].append(row)
            save(args, results)
            shutil.rmtree(root / f"wave-{n}", ignore_errors=True)
        if args.idle_workers and database == args.databases[0]:
            log(f"{database}: {args.idle_workers} idle workers for {args.idle_seconds * 3:.0f} s")
            out["workers"] = idle_workers(server, root, args.idle_workers, args.idle_seconds * 3)
    finally:
        server.stop()
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=ints, default=[16, 64, 200], help="disk layers per image (16,64,200)")
    parser.add_argument("--runners", type=ints, default=[4, 16, 32], help="runners per wave (4,16,32)")
    parser.add_argument("--wave-layers", type=int, default=16, help="disk layers of the wave image (16)")
    parser.add_argument("--layer-kib", type=int, default=32, help="KiB per disk layer (32)")
    parser.add_argument("--databases", type=lambda s: s.split(","), default=["postgres", "sqlite"],
                        help="postgres,sqlite (the first also measures the core-only client CPU)")
    parser.add_argument("--sqlite-max-runners", type=int, default=16,
                        help="largest wave on SQLite (16): it already fails there, and bigger waves only wait on locks")
    parser.add_argument("--egress-slots", type=int, default=8, help="the tartflow-egress limit's slots (8)")
    parser.add_argument("--repeat", type=int, default=1, help="single pulls per image (1)")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle baseline window (10)")
    parser.add_argument("--idle-workers", type=int, default=2, help="idle workers to count polls of (2; 0: skip)")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the Prefect server, e.g. PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED=false")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds any one wave may take (600)")
    parser.add_argument("--out", type=Path, default=None, help="directory for scale.md and scale.json")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: servers, the database and runners are stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="tartflow-scale-"))
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "databases": []}
    try:
        with start_registry(work / "registry") as registry:
            log("pushing images")
            images = {n: push_image(registry.url, work, n, args.layer_kib) for n in args.layers}
            wave_image = images.get(args.wave_layers) or push_image(registry.url, work, args.wave_layers,
                                                                     args.layer_kib)
            for database in args.databases:
                try:
                    bench_database(database, args, work, images, wave_image, results)
                except PostgresUnavailable as exc:
                    log(f"{database}: skipped: {exc}")
                    results["databases"].append({"database": database, "skipped": str(exc)})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.monotonic() - started
    report = render(results)
    print(report)
    save(args, results)
    if args.out:
        (args.out / "scale.md").write_text(report)
    failed = sum(row["failed"] for db in results["databases"] for row in db.get("per_pull", []) + db.get("waves", []))
    if failed:
        log(f"{failed} failed or crashed runs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
