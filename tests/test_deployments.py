"""The fleet as deployed with Prefect's own commands: a real ``prefect server``, ``prefect
work-pool create`` and plain ``prefect --no-prompt deploy --all`` from this checkout with no
extra variable, two runner workers started with ``prefect worker start`` in their own
directories (each its own TART_HOME) and a control worker started by the convenience
``python -m deployments.fleet runner``, on one machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.checks import fetchable_bytes
from tests.conftest import SMALL_BLOCK_SIZES, _small_stored
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage, build_and_push, make_disk
from tests.support.prefectserver import PrefectServer, prefect_env
from tests.support.registry import Registry
from tests.support.runnerfleet import run_python, stop_children
from tests.test_operations import wait_for_events

CHECKOUT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))
RUNNERS = ("runner-a", "runner-b")


@dataclass
class Fleet:
    server: PrefectServer
    homes: dict[str, Path]  # runner -> TART_HOME
    env: dict[str, str]
    proxy: FaultProxy

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PREFECT, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=CHECKOUT)

    def python(self, code: str) -> str:
        return run_python(self.env, code)


def _worker(env: dict[str, str], queue: str, home: Path, log: Path) -> subprocess.Popen[bytes]:
    """A worker started in ``home`` (not the checkout), with no PYTHONPATH: it runs the flows of
    the tartflow installed in its Python, as a runner set up by hand would."""
    worker_env = {**env, "PREFECT_HOME": str(home / "prefect"), "TART_HOME": str(home / "tart"),
                  "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                  "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    worker_env.pop("PYTHONPATH", None)
    argv = ([sys.executable, "-m", "deployments.fleet", "runner", queue] if queue == "control" else
            [PREFECT, "worker", "start", "--pool", "mac-runners", "--work-queue", queue, "--type", "process"])
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=worker_env, stdout=out, stderr=subprocess.STDOUT, cwd=home)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    server = PrefectServer(root)
    env = {**prefect_env(root / "client", server.api_url), "TARTFLOW_READ_TIMEOUT": "10"}
    env.pop("TARTFLOW_CHECKOUT", None)
    workers: list[subprocess.Popen[bytes]] = []
    proxy = FaultProxy(registry.url).start()
    try:
        for command in (
            ("work-pool", "create", "mac-runners", "--type", "process"),
            *(("work-queue", "create", queue, "--pool", "mac-runners") for queue in RUNNERS),
            ("gcl", "create", "tartflow-egress", "--limit", "4"),
            ("--no-prompt", "deploy", "--all"),
        ):
            done = subprocess.run([PREFECT, *command], env=env, capture_output=True, text=True, timeout=300,
                                  cwd=CHECKOUT)
            assert done.returncode == 0, " ".join(command) + done.stdout[-3000:] + done.stderr[-3000:]
        homes = {name: root / name for name in (*RUNNERS, "control")}
        for name, home in homes.items():
            home.mkdir()
            workers.append(_worker(env, name, home, root / f"{name}.log"))
        yield Fleet(server, {r: homes[r] / "tart" for r in RUNNERS}, env, proxy)
    finally:
        proxy.stop()
        stop_children(workers, grace=20)
        server.stop()


def _wait_for_live_runners(fleet: Fleet) -> None:
    code = ("from flows.prewarm import live_runners; print(','.join(live_runners()))")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if set(fleet.python(code).strip().split(",")) >= set(RUNNERS):
            return
        time.sleep(1)
    raise AssertionError("runner workers never polled their queues")


def _prewarm(fleet: Fleet, *images: BuiltImage, **extra: object) -> None:
    refs = [f"{fleet.proxy.host}/{image.repository}:{image.tag}" for image in images]
    params = json.dumps({"images": refs, "insecure": True, **extra})
    run = fleet.prefect("deployment", "run", "prewarm-fleet/fleet", "--params", params, "--watch",
                        "--watch-timeout", "400", timeout=420)
    assert run.returncode == 0 and "COMPLETED" in run.stdout.upper(), run.stdout[-4000:] + run.stderr[-4000:]


def _assert_on_every_runner(fleet: Fleet, image: BuiltImage) -> None:
    for runner, home in fleet.homes.items():
        directory = vm_dir_at(home, fleet.proxy.host, image)
        assert (directory / "disk.img").read_bytes() == image.disk_path.read_bytes(), runner
        assert (directory / "nvram.bin").read_bytes() == image.nvram, runner
        assert os.readlink(directory.parent / image.tag) == str(directory), runner


def _assert_names_events_and_live_table(fleet: Fleet, image: BuiltImage) -> None:
    """Child runs named ``<runner>: <reference>``; a pulled event per runner naming the image,
    its digest and the runner's work queue; one prewarm.completed with the counts; the live
    table's last state shows every pull completed at 100 %."""
    api = fleet.server.api_url
    ref = f"{fleet.proxy.host}/{image.repository}:{image.tag}"
    runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [f"{r}: {ref}" for r in RUNNERS]}}},
                      timeout=30).json()
    assert sorted(r["name"] for r in runs) == [f"{r}: {ref}" for r in RUNNERS]
    pulled = wait_for_events(api, ["tartflow.image.pulled"], f"tartflow.image.{ref}", count=len(RUNNERS))
    queues = set()
    for event in pulled:
        assert event["resource"]["tartflow.image.digest"] == image.manifest_digest
        queues |= {r["prefect.resource.name"] for r in event["related"] if r["prefect.resource.role"] == "work-queue"}
    assert queues == set(RUNNERS)
    # Other tests of this module prewarm other images on the same server: keep this image's.
    completed = wait_for_events(api, ["tartflow.prewarm.completed"], where=lambda e: e["payload"]["images"] == [ref])
    assert len(completed) == 1
    assert completed[0]["payload"] | {"pulls": 2, "completed": 2, "failed": 0} == completed[0]["payload"]
    live = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": ["tartflow-prewarm"]}}},
                      timeout=30).json()
    tables = [rows for a in live if "percent" in (table := json.loads(a["data"]))[0]  # the live ones
              if (rows := [row for row in table if row["image"] == ref])]
    assert [sorted((row["runner"], row["state"], row["percent"]) for row in rows) for rows in tables] == [
        [(r, "COMPLETED", 100.0) for r in RUNNERS]]


def test_the_pull_step_says_what_to_do_when_the_flows_are_missing(tmp_path: Path) -> None:
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text("")  # a `flows` package without tartflow's flows
    done = subprocess.run([sys.executable, "-c", "from deployments.steps import installed_code; installed_code()"],
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("deployments.steps.CodeNotFound: tartflow's flows are not at") and "pip install" in last


def vm_dir_at(tart_home: Path, host: str, image: BuiltImage) -> Path:
    return tart_home / "cache" / "OCIs" / host.replace(":", "%3A") / image.repository / image.manifest_digest


def test_prewarm_fills_every_runner_then_a_refresh_moves_only_the_changed_layer(
    fleet: Fleet, registry: Registry, tmp_path: Path
) -> None:
    _wait_for_live_runners(fleet)
    disk = tmp_path / "v1.img"
    make_disk(disk, 16 * 1024 * 1024, seed=5)
    kw = dict(layer_size=2 * 1024 * 1024, block_sizes=SMALL_BLOCK_SIZES, stored=_small_stored)
    first = build_and_push(registry.url, "fleet/macos", "latest", disk, **kw)  # type: ignore[arg-type]
    fleet.proxy.reset_counters()
    _prewarm(fleet, first)
    _assert_on_every_runner(fleet, first)
    assert fleet.proxy.blob_bytes_served == 2 * fetchable_bytes(first)
    _assert_names_events_and_live_table(fleet, first)

    # Next night: the tag moves to a version in which one disk layer changed.
    changed = tmp_path / "v2.img"
    shutil.copyfile(disk, changed)
    with open(changed, "r+b") as f:
        f.seek(5 * 1024 * 1024 + 123)
        f.write(os.urandom(4096))
    second = build_and_push(registry.url, "fleet/macos", "latest", changed, **kw)  # type: ignore[arg-type]
    new_layers = {d["digest"]: d["size"] for d in second.disk_layers} .items() - {
        d["digest"]: d["size"] for d in first.disk_layers}.items()
    assert len(new_layers) == 1
    fleet.proxy.reset_counters()
    _prewarm(fleet, second)
    _assert_on_every_runner(fleet, second)
    assert fleet.proxy.blob_bytes_served == 2 * sum(size for _, size in new_layers)
    for home in fleet.homes.values():  # the image the tag left is collected, as Tart does
        assert not vm_dir_at(home, fleet.proxy.host, first).exists()


def test_prewarm_prune_older_than_drops_stale_images_not_in_the_run(
    fleet: Fleet, registry: Registry, tmp_path: Path
) -> None:
    """Issue 13: after its pulls each runner drops cached images not in the run's list and not
    accessed within ``prune_older_than``; the prewarm run's artifact lists what went."""
    _wait_for_live_runners(fleet)
    built = {}
    for n, name in enumerate(("stale", "wanted")):
        disk = tmp_path / f"{name}.img"
        make_disk(disk, 4 * 1024 * 1024, seed=90 + n)
        built[name] = build_and_push(registry.url, f"fleet/{name}", "v1", disk, layer_size=2 * 1024 * 1024)
    _prewarm(fleet, built["stale"], built["wanted"])
    week_ago = time.time() - 7 * 86400
    for home in fleet.homes.values():
        for image in built.values():  # both untouched for a week; only "wanted" is in the next run
            os.utime(vm_dir_at(home, fleet.proxy.host, image), (week_ago, week_ago))
    _prewarm(fleet, built["wanted"], prune_older_than=86400)
    for runner, home in fleet.homes.items():
        assert not vm_dir_at(home, fleet.proxy.host, built["stale"]).exists(), runner
        assert not (vm_dir_at(home, fleet.proxy.host, built["stale"]).parent / "v1").is_symlink(), runner
        assert (vm_dir_at(home, fleet.proxy.host, built["wanted"]) / "disk.img").read_bytes() == \
            built["wanted"].disk_path.read_bytes(), runner
    code = (
        "import json\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey\n"
        "with get_client(sync_client=True) as c:\n"
        "    arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=['tartflow-prewarm-pruned'])))\n"
        "    print(arts[-1].data)\n"
    )
    rows = json.loads(fleet.python(code))
    stale = f"{fleet.proxy.host}/fleet/stale:v1"
    assert sorted((row["runner"], row["image"]) for row in rows) == [(r, stale) for r in sorted(RUNNERS)], rows


def test_nightly_deployment_carries_its_cron_schedule(fleet: Fleet) -> None:
    code = (
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    d = c.read_deployment_by_name('prewarm-fleet/nightly')\n"
        "    s = d.schedules[0].schedule\n"
        "    print(s.cron, s.timezone, d.schedules[0].active, d.work_queue_name, d.work_pool_name)\n"
    )
    assert fleet.python(code).split() == ["0", "3", "*", "*", "*", "UTC", "True", "control", "mac-runners"]


def test_pull_runs_publish_a_layer_table(fleet: Fleet, registry: Registry, tmp_path: Path) -> None:
    """A prewarm of an image no runner has publishes, per runner, a pull table whose rows are
    the image's blobs each fetched in full, and a prewarm table with every runner COMPLETED.
    Runs its own prewarm, so it passes alone. Mutant it catches: ``flows.pull._publish``
    reporting ``reused`` or ``resumed_from`` as ``fetched`` (the fetched column reads 0)."""
    _wait_for_live_runners(fleet)
    disk = tmp_path / "artifact.img"
    make_disk(disk, 4 * 1024 * 1024, seed=11)
    image = build_and_push(registry.url, "fleet/artifacts", "v1", disk, layer_size=2 * 1024 * 1024,
                           block_sizes=SMALL_BLOCK_SIZES, stored=_small_stored)
    _prewarm(fleet, image)
    code = (
        "import json\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey\n"
        "with get_client(sync_client=True) as c:\n"
        "    arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=['tartflow-pull', 'tartflow-prewarm'])))\n"
        "    print(json.dumps([{'key': a.key, 'type': a.type, 'description': a.description, 'data': a.data} for a in arts]))\n"
    )
    arts = json.loads(fleet.python(code))
    ref = f"{fleet.proxy.host}/{image.repository}:{image.tag}"
    pulls = [a for a in arts if a["key"] == "tartflow-pull" and ref in (a["description"] or "")]
    assert len(pulls) == len(RUNNERS) and all(a["type"] == "table" for a in pulls)
    blobs = {d["digest"][:19]: round(d["size"] / 1e6, 2) for d in image.layers}
    for art in pulls:
        rows = json.loads(art["data"]) if isinstance(art["data"], str) else art["data"]
        assert {row["blob"] for row in rows} == set(blobs)
        assert all(row["size MB"] == blobs[row["blob"]] == row["fetched MB"] for row in rows), rows
        assert all(row["reused MB"] == 0 and row["already on disk MB"] == 0 for row in rows), rows
    tables = [json.loads(a["data"]) if isinstance(a["data"], str) else a["data"]
              for a in arts if a["key"] == "tartflow-prewarm" and a["type"] == "table"]
    # The final table, not the live one kept current while the prewarm ran (it has a percent).
    rows = [row for table in tables if "percent" not in table[0] for row in table if row["image"] == ref]
    assert sorted(row["runner"] for row in rows) == sorted(RUNNERS)
    assert all(row["state"] == "COMPLETED" for row in rows), rows


def test_the_fleet_convenience_is_idempotent_over_a_fleet_made_with_prefects_commands(fleet: Fleet) -> None:
    images = '["example.invalid/acme/macos:v1"]'
    setup = subprocess.run([sys.executable, "-m", "deployments.fleet", "setup", "--images", images],
                           env=fleet.env, capture_output=True, text=True, timeout=300, cwd=CHECKOUT)
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    code = (
        "from prefect.variables import Variable\n"
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    limit = c.read_global_concurrency_limit_by_name('tartflow-egress').limit\n"
        "    pulls = c.read_deployment_by_name('pull-image/on-demand').pull_steps\n"
        "print(Variable.get('tartflow-images'), limit, pulls)\n"
    )
    out = fleet.python(code)
    assert "['example.invalid/acme/macos:v1'] 4 [{'deployments.steps.installed_code': {}}]" in out, out
