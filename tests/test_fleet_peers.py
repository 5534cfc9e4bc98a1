"""The fleet with peers (issue 16): a real ``prefect server``, ``prefect deploy --all`` from this
checkout, three runners started with ``--serve`` (each its own TART_HOME and peer port) and a
control worker; one prewarm moves about one image from upstream, not one per runner."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.checks import fetchable_bytes
from tests.conftest import SMALL_BLOCK_SIZES, _small_stored
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import build_and_push, make_disk
from tests.support.prefectserver import PrefectServer
from tests.support.registry import Registry
from tests.support.runnerfleet import runner_fleet, wait_serving
from tests.test_deployments import PREFECT, Fleet, vm_dir_at

CHECKOUT = Path(__file__).resolve().parent.parent
RUNNERS = ("peer-a", "peer-b", "peer-c")
TOKEN = "fleet-peer-token-for-tests"


@pytest.fixture(scope="module")
def peer_fleet(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("peer-fleet")
    server = PrefectServer(root)
    proxy = FaultProxy(registry.url).start()
    try:
        with runner_fleet(root, server.api_url, RUNNERS, token=TOKEN, egress_slots=4, read_timeout=10,
                          setup_timeout=300) as runners:
            yield Fleet(server, runners.tart_homes(), runners.env, proxy)
    finally:
        proxy.stop()
        server.stop()


def test_a_three_runner_prewarm_moves_about_one_image_from_upstream(
    peer_fleet: Fleet, registry: Registry, tmp_path: Path
) -> None:
    wait_serving(peer_fleet.env, RUNNERS, timeout=120)
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
