"""The fleet's server on PostgreSQL: deployed and pulling, then gone without a trace; and four
runners pulling at once against it with no failed run. Larger fleets run only in
``python -m benchmarks.scale`` (docs/scale.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.support.fleetsim import CHECKOUT, EGRESS_LIMIT, ScaleServer, run_wave
from tests.support.imagebuilder import BuiltImage, build_and_push, make_disk
from tests.support.postgres import Postgres
from tests.support.prefectserver import PrefectServer, prefect_env
from tests.support.registry import Registry

PREFECT = str(Path(sys.executable).with_name("prefect"))
LAYER = 64 * 1024


def _tiny_image(registry: Registry, where: Path, name: str, layers: int) -> BuiltImage:
    disk = where / f"{name}.img"
    make_disk(disk, layers * LAYER, seed=layers + 17, pattern="random")  # distinct layers
    return build_and_push(registry.url, f"scale/{name}", "v1", disk, layer_size=LAYER)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _flow_runs(api_url: str) -> list[dict[str, object]]:
    # The nightly deployment's schedule adds runs of prewarm-fleet; only pulls are of interest.
    response = httpx.post(f"{api_url}/flow_runs/filter", json={"flows": {"name": {"any_": ["pull-image"]}}},
                          timeout=60)
    response.raise_for_status()
    runs: list[dict[str, object]] = response.json()
    return runs


@pytest.mark.timeout(420)
def test_postgres_server_deploys_and_pulls_then_leaves_no_process_or_data(
    postgres: Postgres, registry: Registry, tmp_path: Path
) -> None:
    image = _tiny_image(registry, tmp_path, "deployed", 3)
    (tmp_path / "server").mkdir()
    server = PrefectServer(tmp_path / "server", database_url=postgres.url)
    worker: subprocess.Popen[bytes] | None = None
    try:
        env = {**prefect_env(tmp_path / "client", server.api_url), "TARTFLOW_CHECKOUT": str(CHECKOUT),
               "TARTFLOW_READ_TIMEOUT": "10"}
        setup = subprocess.run([sys.executable, "-m", "deployments.fleet", "setup", "--egress-slots", "2"],
                               env=env, capture_output=True, text=True, timeout=300, cwd=CHECKOUT)
        assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
        runner = tmp_path / "runner"
        runner.mkdir()
        worker_env = {**env, "PREFECT_HOME": str(runner / "prefect"), "TART_HOME": str(runner / "tart"),
                      "TARTFLOW_SPACE_MARGIN": "0", "PREFECT_WORKER_QUERY_SECONDS": "1",
                      "PREFECT_WORKER_PREFETCH_SECONDS": "5", "PYTHONPATH": str(CHECKOUT)}
        with open(tmp_path / "worker.log", "wb") as log:  # the on-demand deployment's queue
            worker = subprocess.Popen([sys.executable, "-m", "deployments.fleet", "runner", "default"],
                                      env=worker_env, stdout=log, stderr=subprocess.STDOUT, cwd=runner)
        params = json.dumps({"reference": image.reference, "insecure": True})
        run = subprocess.run([PREFECT, "deployment", "run", "pull-image/on-demand", "--params", params, "--watch",
                              "--watch-timeout", "300"], env=env, capture_output=True, text=True, timeout=330,
                             cwd=CHECKOUT)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + (tmp_path / "worker.log").read_text()
        runs = _flow_runs(server.api_url)
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
        digest_dir = (runner / "tart" / "cache" / "OCIs" / image.host.replace(":", "%3A") / image.repository
                      / image.manifest_digest)
        assert (digest_dir / "disk.img").read_bytes() == image.disk_path.read_bytes()
        # The run lives in PostgreSQL, not in a SQLite file the server fell back to.
        assert postgres.psql("SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'") == "1"
        assert not list((tmp_path / "server").glob("*.db"))
    finally:
        if worker is not None:
            _stop(worker)
        server.stop()
        postgres.stop()
    assert server._proc.poll() is not None
    assert postgres.running_pids() == []
    assert not postgres.root.exists()


@pytest.mark.timeout(420)
def test_four_runners_pulling_at_once_all_complete(postgres: Postgres, registry: Registry, tmp_path: Path) -> None:
    layers = 6
    image = _tiny_image(registry, tmp_path, "wave", layers)
    server = ScaleServer(tmp_path / "scale", "postgres", postgres=postgres)
    try:
        server.ensure_egress_limit(2)  # fewer slots than runners: the limit is contended
        before = server.counters()
        started = time.monotonic()
        wave = run_wave(server, image.reference, [tmp_path / f"runner-{i}" for i in range(4)], timeout=300)
        assert time.monotonic() - started < 300
        after = server.counters().minus(before)
        assert [r.data.get("error") for r in wave.runners if not r.ok] == []
        states = server.flow_run_states(wave.flow_run_ids)
        assert sorted(states.values()) == ["COMPLETED"] * 4
        tasks = server.task_runs(wave.flow_run_ids)
        assert tasks["fetch-layer"] == 4 * (layers + 2)  # every disk layer, the config and the NVRAM
        assert tasks["fetch-manifest"] == tasks["assemble-vm"] == 4
        for runner in wave.runners:
            assert Path(runner.data["path"], "disk.img").read_bytes() == image.disk_path.read_bytes()
        # The harness's two views of the load agree: every request a client timed, the server logged.
        assert after.request_count == len(wave.latencies) > 0
        # The egress gate (tasks/egress.py): per fetched layer one slot taken and one released, and
        # no lease renewal for a short layer (Prefect's concurrency() renewed every lease at once).
        gate = Counter({(path.rsplit("/", 1)[-1], status): n for (_, path, status), n in after.requests.items()
                        if "/concurrency_limits/" in path})
        assert gate["increment-with-lease", 200] == gate["decrement-with-lease", 204] == tasks["fetch-layer"]
        assert sum(n for (route, _), n in gate.items() if route == "renew") == 0
        assert server.api("GET", f"/v2/concurrency_limits/{EGRESS_LIMIT}")["active_slots"] == 0
        assert after.rows is not None and after.rows > 0
    finally:
        server.stop()


_POLL_PROBE = """
import json, sys, time
from uuid import UUID
from tests.support.scalerunner import _REQUESTS, _install_timing
_install_timing(sys.argv[1])
from flows.prewarm import _wait
runs = {("runner-%d" % i, "image"): UUID(run_id) for i, run_id in enumerate(json.loads(sys.argv[2]))}
open(sys.argv[3], "w").close()
started = time.monotonic()
finals = _wait(runs, poll=0.5)
print(json.dumps({"seconds": time.monotonic() - started, "requests": _REQUESTS,
                  "finals": sorted(state for state, _ in finals.values())}))
"""


@pytest.mark.timeout(300)
def test_prewarm_waits_for_a_fleet_with_one_read_per_poll(prefect_server: PrefectServer, tmp_path: Path) -> None:
    api = prefect_server.api_url
    flow = httpx.post(f"{api}/flows/", json={"name": "scale-poll-probe"}, timeout=60).json()
    ids = [httpx.post(f"{api}/flow_runs/", json={"flow_id": flow["id"], "state": {"type": kind}}, timeout=60).json()["id"]
           for kind in ["COMPLETED"] * 11 + ["RUNNING"]]
    env = {**prefect_env(tmp_path / "prefect", api), "PYTHONPATH": str(CHECKOUT)}
    ready = tmp_path / "waiting"
    probe = subprocess.Popen([sys.executable, "-c", _POLL_PROBE, api, json.dumps(ids), str(ready)], env=env,
                             cwd=CHECKOUT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists() and probe.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(3)  # polls see eleven runs done and one still running
    done = httpx.post(f"{api}/flow_runs/{ids[-1]}/set_state", json={"state": {"type": "COMPLETED"}, "force": True},
                      timeout=60)
    assert done.status_code in (200, 201), done.text
    out, err = probe.communicate(timeout=240)
    assert probe.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert result["finals"] == ["COMPLETED"] * 12
    reads = [(method, path) for method, path, _, _ in result["requests"] if "/flow_runs" in path]
    assert all(path.endswith("/flow_runs/filter") for _, path in reads), reads  # never one read per run
    assert 1 <= len(reads) <= result["seconds"] / 0.5 + 2
