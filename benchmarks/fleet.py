"""Issue 16's benchmark: what one ``prewarm-fleet`` costs upstream when runners feed each other.

Run from the repository root::

    python -m benchmarks.fleet                          # 6 runners, a 96 MiB image
    python -m benchmarks.fleet --runners 8 --disk-mib 256 --seeds 2

All on loopback: a CNCF distribution registry behind the counting fault proxy (tests/support),
one real ``prefect server``, ``deployments.fleet setup`` from this checkout, ``--runners``
runners started with ``python -m deployments.fleet runner NAME --serve 127.0.0.1:PORT`` (each its
own ``TART_HOME``, worker and peer port) and a control worker, as ``tests/support/runnerfleet.py``
starts them for the tests too. It then measures:

- one runner's cold pull alone (``tartflow pull`` into a fresh ``TART_HOME``, the same server);
- the N-runner prewarm (``prefect deployment run prewarm-fleet/fleet --watch``), wall time from
  the command's start to its end;
- upstream blob bytes during the prewarm, against the image's compressed size (target <= 1.1x);
- the bytes each source served, summed from every pull run's table artifact (peer, fetched
  upstream, reused from Tart's cache).

Every runner's VM is compared byte for byte with the source disk. MB is 10^6 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage, build_and_push, make_disk
from tests.support.prefectserver import PrefectServer, prefect_env
from tests.support.registry import start_registry
from tests.support.runnerfleet import RunnerFleet, run_python, runner_fleet, wait_serving

CHECKOUT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))
TARTFLOW = str(Path(sys.executable).with_name("tartflow"))
TOKEN = "benchmark-peer-token"


def log(text: str) -> None:
    print(f"[fleet-bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _sources(env: dict[str, str]) -> dict[str, float]:
    """MB per source over every pull run's table artifact."""
    code = (
        "import json\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey\n"
        "with get_client(sync_client=True) as c:\n"
        "    arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=['tartflow-pull'])))\n"
        "    print(json.dumps([a.data for a in arts]))\n"
    )
    totals = {"peer MB": 0.0, "fetched MB": 0.0, "reused MB": 0.0}
    for table in json.loads(run_python(env, code)):
        rows = json.loads(table) if isinstance(table, str) else table
        for row in rows:
            for key in totals:
                totals[key] += float(row.get(key) or 0)
    return totals


def _check_vm(home: Path, host: str, image: BuiltImage) -> None:
    vm = home / "tart" / "cache" / "OCIs" / host.replace(":", "%3A") / image.repository / image.manifest_digest
    if (vm / "disk.img").read_bytes() != image.disk_path.read_bytes():
        raise RuntimeError(f"{home.name}: disk.img is not byte-exact")


def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="fleet-bench-", dir=args.workdir))
    runners = [f"runner-{i}" for i in range(args.runners)]
    # Everything started is stopped however the run ends, runners first.
    with contextlib.ExitStack() as stack:
        registry = stack.enter_context(start_registry(root / "registry"))
        proxy = stack.enter_context(FaultProxy(registry.url))
        (root / "server").mkdir()
        server = PrefectServer(root / "server")
        stack.callback(server.stop)
        fleet = stack.enter_context(runner_fleet(root, server.api_url, runners, token=TOKEN, egress_slots=8))
        return _measure(args, root, fleet, proxy, server, registry.url)
    raise AssertionError("unreachable")


def _measure(args: argparse.Namespace, root: Path, fleet: RunnerFleet, proxy: FaultProxy, server: PrefectServer,
             registry_url: str) -> int:
    env, runners = fleet.env, list(fleet.runners)
    disk = root / "disk.img"
    make_disk(disk, args.disk_mib * 1024 * 1024, seed=16)
    image = build_and_push(registry_url, "bench/fleet", "v1", disk, layer_size=args.layer_mib * 1024 * 1024)
    compressed = image.total_compressed - int(image.manifest["config"]["size"])
    log(f"image: {args.disk_mib} MiB disk, {compressed / 1e6:.1f} MB compressed")
    wait_serving(env, runners, timeout=300, interval=2)
    ref = f"{proxy.host}/{image.repository}:{image.tag}"

    solo = root / "solo"
    started = time.monotonic()
    subprocess.run([TARTFLOW, "pull", "--insecure", ref], check=True, capture_output=True, timeout=1800,
                   env={**prefect_env(solo / "prefect", server.api_url), "TART_HOME": str(solo / "tart")})
    one_pull = time.monotonic() - started
    log(f"one runner alone: {one_pull:.1f} s")

    proxy.reset_counters()
    started = time.monotonic()
    params = {"images": [ref], "insecure": True, "runners": runners, "seeds": args.seeds}
    done = subprocess.run([PREFECT, "deployment", "run", "prewarm-fleet/fleet", "--params", json.dumps(params),
                           "--watch", "--watch-timeout", "3600"], env=env, cwd=CHECKOUT, capture_output=True,
                          text=True, timeout=3700)
    prewarm = time.monotonic() - started
    if done.returncode != 0 or "COMPLETED" not in done.stdout.upper():
        raise RuntimeError(f"prewarm failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    upstream = proxy.blob_bytes_served
    for name in runners:
        _check_vm(fleet.homes[name], proxy.host, image)
    sources = _sources(env)
    print(f"runners: {args.runners}, seeds: {args.seeds}, image {compressed / 1e6:.1f} MB compressed, "
          f"{args.disk_mib} MiB disk")
    print(f"upstream blob bytes for the prewarm: {upstream / 1e6:.1f} MB = {upstream / compressed:.2f}x the "
          f"image (target <= 1.1x; {args.runners}.00x without peers)")
    print(f"wall time: prewarm of {args.runners} runners {prewarm:.1f} s; one runner alone {one_pull:.1f} s "
          f"({prewarm / one_pull:.1f}x)")
    print("bytes per source over all pulls (incl. the solo one): "
          + ", ".join(f"{key} {value:.1f}" for key, value in sources.items()))
    return 0 if upstream <= 1.1 * compressed else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runners", type=int, default=6, help="simulated runners (default 6)")
    parser.add_argument("--seeds", type=int, default=1, help="runners that pull from upstream first (default 1)")
    parser.add_argument("--disk-mib", type=int, default=96, help="disk size of the image (default 96 MiB)")
    parser.add_argument("--layer-mib", type=int, default=16, help="disk layer size (default 16 MiB)")
    parser.add_argument("--workdir", default=None, help="where the run's files go (default: a temp directory)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
