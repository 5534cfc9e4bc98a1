"""The fleet with peers (issue 16): a real ``prefect server``, ``prefect deploy --all`` from this
checkout, three runners started with ``--serve`` (each its own TART_HOME and peer port) and a
control worker; one prewarm moves about one image from upstream, not one per runner."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.checks import fetchable_bytes
from tests.conftest import SMALL_BLOCK_SIZES, _small_stored
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import build_and_push, make_disk
from tests.support.prefectserver import PrefectServer, prefect_env
from tests.support.registry import Registry, free_port
from tests.test_deployments import PREFECT, Fleet, vm_dir_at

CHECKOUT = Path(__file__).resolve().parent.parent
RUNNERS = ("peer-a", "peer-b", "peer-c")
TOKEN = "fleet-peer-token-for-tests"


def _runner(env: dict[str, str], queue: str, home: Path, log: Path, serve: bool) -> subprocess.Popen[bytes]:
    worker_env = {**env, "PREFECT_HOME": str(home / "prefect"), "TART_HOME": str(home / "tart"),
                  "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                  "PREFECT_RUNNER_POLL_FREQUENCY": "1", "TARTFLOW_PEER_TOKEN": TOKEN, "PYTHONPATH": str(CHECKOUT)}
    serving = ["--serve", f"127.0.0.1:{free_port()}"] if serve else []
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "deployments.fleet", "runner", queue, *serving],
                                env=worker_env, stdout=out, stderr=subprocess.STDOUT, cwd=home)


@pytest.fixture(scope="module")
def peer_fleet(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("peer-fleet")
    server = PrefectServer(root)
    env = {**prefect_env(root / "client", server.api_url), "TARTFLOW_CHECKOUT": str(CHECKOUT),
           "TARTFLOW_READ_TIMEOUT": "10"}
    children: list[subprocess.Popen[bytes]] = []
    proxy = FaultProxy(registry.url).start()
    try:
        setup = subprocess.run([sys.executable, "-m", "deployments.fleet", "setup", "--egress-slots", "4"],
                               env=env, capture_output=True, text=True, timeout=300, cwd=CHECKOUT)
        assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
        homes = {name: root / name for name in (*RUNNERS, "control")}
        for name, home in homes.items():
            home.mkdir()
            children.append(_runner(env, name, home, root / f"{name}.log", serve=name != "control"))
        yield Fleet(server, {r: homes[r] / "tart" for r in RUNNERS}, env, proxy)
    finally:
        proxy.stop()
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        server.stop()


def _wait_for_serving_runners(fleet: Fleet) -> None:
    code = ("from flows.prewarm import live_runners; from flows.peering import registered_peers\n"
            "print(','.join(sorted(set(live_runners()) & set(registered_peers()))))")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if set(fleet.python(code).strip().split(",")) >= set(RUNNERS):
            return
        time.sleep(1)
    raise AssertionError("runners never came up serving and polling")


def test_a_three_runner_prewarm_moves_about_one_image_from_upstream(
    peer_fleet: Fleet, registry: Registry, tmp_path: Path
) -> None:
    _wait_for_serving_runners(peer_fleet)
    disk = tmp_path / "disk.img"
    make_disk(disk, 16 * 1024 * 1024, seed=16)
    image = build_and_push(registry.url, "fleet/peers", "v1", disk, layer_size=2 * 1024 * 1024,
                           block_sizes=SMALL_BLOCK_SIZES, stored=_small_stored)
    peer_fleet.proxy.reset_counters()
    ref = f"{peer_fleet.proxy.host}/{image.repository}:{image.tag}"
    run = subprocess.run([PREFECT, "deployment", "run", "prewarm-fleet/fleet", "--params",
                          json.dumps({"images": [ref], "insecure": True, "runners": list(RUNNERS)}),
                          "--watch", "--watch-timeout", "500"],
                         env=peer_fleet.env, capture_output=True, text=True, timeout=520, cwd=CHECKOUT)
    assert run.returncode == 0 and "COMPLETED" in run.stdout.upper(), run.stdout[-4000:] + run.stderr[-4000:]
    for runner, home in peer_fleet.homes.items():
        directory = vm_dir_at(home, peer_fleet.proxy.host, image)
        assert (directory / "disk.img").read_bytes() == image.disk_path.read_bytes(), runner
        assert (directory / "nvram.bin").read_bytes() == image.nvram, runner
    one_image = fetchable_bytes(image)
    assert one_image <= peer_fleet.proxy.blob_bytes_served <= 1.1 * one_image
