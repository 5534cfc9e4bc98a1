"""A simulated fleet of peer-serving runners on one Prefect server: what ``tests/test_fleet_peers.py``
and ``python -m benchmarks.fleet`` both start.

:func:`runner_fleet` runs ``python -m deployments.fleet setup`` from this checkout, then starts
one ``python -m deployments.fleet runner NAME --serve 127.0.0.1:PORT`` per runner (each its own
home with ``prefect/``, ``tart/`` and ``runner.log``, its own peer port, the fleet's peer token)
plus an unserved control runner, and stops them all however the block ends. Workers poll every
second so a run is picked up at once. :func:`wait_serving` waits until every runner is both
polling and registered as a peer, which is when a prewarm can count on them.

Prefect is never imported here: what needs it (``flows.prewarm``, ``flows.peering``) runs in a
subprocess against the fleet's environment, as :mod:`tests.support.fleetsim` does.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.prefectserver import prefect_env
from tests.support.registry import free_port

__all__ = ["RunnerFleet", "run_python", "runner_fleet", "serving_runners", "start_runner", "stop_children",
           "wait_serving"]

CHECKOUT = Path(__file__).resolve().parents[2]
_SERVING = ("from flows.prewarm import live_runners; from flows.peering import registered_peers\n"
            "print(','.join(sorted(set(live_runners()) & set(registered_peers()))))")


def run_python(env: dict[str, str], code: str, timeout: float = 120) -> str:
    """Stdout of ``python -c code`` in the checkout; raises if it fails."""
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=CHECKOUT, check=True).stdout


def start_runner(env: dict[str, str], queue: str, home: Path, *, token: str,
                 serve: bool = True) -> subprocess.Popen[bytes]:
    """``deployments.fleet runner queue`` in ``home`` (created), running this checkout's flows;
    ``serve`` adds ``--serve`` on a free loopback port. Output goes to ``home/runner.log``."""
    home.mkdir(parents=True)
    runner_env = {**env, "PREFECT_HOME": str(home / "prefect"), "TART_HOME": str(home / "tart"),
                  "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                  "PREFECT_RUNNER_POLL_FREQUENCY": "1", "TARTFLOW_PEER_TOKEN": token, "PYTHONPATH": str(CHECKOUT)}
    serving = ["--serve", f"127.0.0.1:{free_port()}"] if serve else []
    with open(home / "runner.log", "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "deployments.fleet", "runner", queue, *serving],
                                env=runner_env, stdout=out, stderr=subprocess.STDOUT, cwd=home)


def stop_children(children: Iterable[subprocess.Popen[bytes]], grace: float = 30) -> None:
    """Terminate all first (a runner stops its worker and peer server together), then give each
    ``grace`` seconds before killing it."""
    children = list(children)
    for child in children:
        child.terminate()
    for child in children:
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def serving_runners(env: dict[str, str]) -> set[str]:
    """Runners whose queue is being polled and whose peer URL is registered, now."""
    return set(run_python(env, _SERVING).strip().split(",")) - {""}


def wait_serving(env: dict[str, str], runners: Iterable[str], *, timeout: float = 120, interval: float = 1) -> None:
    wanted = set(runners)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serving_runners(env) >= wanted:
            return
        time.sleep(interval)
    raise TimeoutError(f"runners never came up serving and polling within {timeout:.0f} s")


@dataclass
class RunnerFleet:
    env: dict[str, str]  # a client of the fleet's server: what setup, prewarm and checks run with
    runners: tuple[str, ...]  # the serving runners (work queues), the control runner not included
    homes: dict[str, Path] = field(default_factory=dict)  # every runner -> its home; TART_HOME is home/"tart"
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def tart_homes(self) -> dict[str, Path]:
        """Each serving runner's TART_HOME."""
        return {runner: self.homes[runner] / "tart" for runner in self.runners}


@contextmanager
def runner_fleet(root: Path, api_url: str, runners: Iterable[str], *, token: str, egress_slots: int,
                 control: str | None = "control", read_timeout: int | None = None,
                 setup_timeout: float = 600) -> Iterator[RunnerFleet]:
    """Set up the server at ``api_url`` and start ``runners`` (serving) and ``control`` (not
    serving, None for none), each in ``root/NAME``; ``read_timeout`` sets ``TARTFLOW_READ_TIMEOUT``
    for the fleet. Every runner is stopped when the block ends."""
    env = {**prefect_env(root / "client", api_url), "TARTFLOW_CHECKOUT": str(CHECKOUT)}
    if read_timeout is not None:
        env["TARTFLOW_READ_TIMEOUT"] = str(read_timeout)
    fleet = RunnerFleet(env, tuple(runners))
    try:
        setup = subprocess.run([sys.executable, "-m", "deployments.fleet", "setup", "--egress-slots",
                                str(egress_slots)], env=env, cwd=CHECKOUT, capture_output=True, text=True,
                               timeout=setup_timeout)
        if setup.returncode != 0:
            raise RuntimeError(f"deployments.fleet setup failed: {setup.stdout[-3000:]}{setup.stderr[-3000:]}")
        for name in [*fleet.runners, *([control] if control else [])]:
            fleet.homes[name] = root / name
            fleet.children.append(start_runner(env, name, root / name, token=token, serve=name != control))
        yield fleet
    finally:
        stop_children(fleet.children)
