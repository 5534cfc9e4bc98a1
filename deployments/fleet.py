"""Prepare a Prefect server for a tartflow fleet, then deploy from this checkout. Idempotent.

    python -m deployments.fleet setup [--egress-slots 8] [--images JSON] [--checkout DIR]
    python -m deployments.fleet runner NAME     # on each Mac runner (launchd keeps it running)
    python -m deployments.fleet runner NAME --serve 0.0.0.0:8377   # ... that also feeds its peers

Creates (when missing) the process work pool ``mac-runners`` with its ``control`` queue, the
global concurrency limit ``tartflow-egress`` (layer downloads in flight across the fleet), sets
the Variable ``tartflow-images`` when ``--images`` is given, then runs ``prefect deploy --all``
in the checkout. Needs ``PREFECT_API_URL``. A convenience: Prefect's own ``prefect work-pool
create`` and ``prefect deploy --all`` give working deployments too (their pull step runs the
flows of the tartflow installed in each worker's Python, see ``deployments/steps.py``).

``runner NAME`` creates the runner's work queue when missing (a Prefect worker does not create
the queue it is told to serve, and a queue nobody created is never marked as polled, so the
prewarm flow would not see the runner as live), then becomes
``prefect worker start --pool mac-runners --work-queue NAME --type process``. Run it with the
runner's own ``TART_HOME`` in the environment.

``--serve HOST:PORT`` also starts ``tartflow serve`` on that address beside the worker (both
stop together) and registers its URL (``--advertise URL``, default ``http://<host name or
HOST>:PORT``) in the Prefect Variable ``tartflow-peer-<NAME>``, where ``prewarm-fleet`` finds it.
The fleet's peer token comes from ``TARTFLOW_PEER_TOKEN`` or the Secret block
``tartflow-peer-token``; every runner must use the same one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists
from prefect.variables import Variable

from flows.prewarm import CONTROL_QUEUE, IMAGES_VARIABLE, POOL
from flows.pull import EGRESS_LIMIT

CHECKOUT = Path(__file__).resolve().parent.parent


def ensure_infrastructure(egress_slots: int) -> None:
    with get_client(sync_client=True) as client:
        for create in (
            lambda: client.create_work_pool(WorkPoolCreate(name=POOL, type="process")),
            lambda: client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=EGRESS_LIMIT, limit=egress_slots)),
        ):
            with contextlib.suppress(ObjectAlreadyExists):
                create()
    ensure_queue(CONTROL_QUEUE)


def ensure_queue(name: str) -> None:
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_queue(name=name, work_pool_name=POOL)


def run_worker(name: str) -> None:
    """Replace this process with the runner's Prefect worker (signals reach it directly)."""
    prefect = str(Path(sys.executable).with_name("prefect"))
    os.execv(prefect, [prefect, "worker", "start", "--pool", POOL, "--work-queue", name, "--type", "process"])


def run_worker_and_peer(name: str, listen: str, advertise: str | None) -> int:
    """The worker and ``tartflow serve`` as children; a signal to this process stops both."""
    from flows.peering import register_peer, unregister_peer
    from flows.secrets import use_peer_token_block
    from tartflow.errors import UsageError
    from tartflow.peer import current_token
    from tartflow.peer.server import parse_listen

    try:
        host, port = parse_listen(listen)
    except UsageError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 2
    use_peer_token_block()
    token = current_token()
    if not token:
        print("fleet: --serve needs the fleet's peer token: set TARTFLOW_PEER_TOKEN or create the Secret "
              "block tartflow-peer-token", file=sys.stderr)
        return 2
    url = advertise or f"http://{socket.gethostname() if host in ('0.0.0.0', '::') else host}:{port}"
    env = {**os.environ, "TARTFLOW_PEER_TOKEN": token}
    tartflow = str(Path(sys.executable).with_name("tartflow"))
    server = subprocess.Popen([tartflow, "serve", "--listen", listen], env=env)
    prefect = str(Path(sys.executable).with_name("prefect"))
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", POOL, "--work-queue", name, "--type", "process"],
                              env=env)
    children = (worker, server)

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    register_peer(name, url)
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    finally:
        with contextlib.suppress(Exception):
            unregister_peer(name)
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
    return worker.returncode or 0


def deploy(checkout: Path) -> None:
    prefect = Path(sys.executable).with_name("prefect")
    subprocess.run([str(prefect), "--no-prompt", "deploy", "--all"], cwd=checkout, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help="create pool, queue, limit, variable; deploy everything")
    setup.add_argument("--egress-slots", type=int, default=8, help="layer downloads in flight fleet-wide (8)")
    setup.add_argument("--images", help='JSON list of references for the nightly refresh, e.g. \'["ghcr.io/a/b:c"]\'')
    setup.add_argument("--checkout", type=Path, default=CHECKOUT, help="checkout to deploy from (prefect.yaml)")
    runner = sub.add_parser("runner", help="serve this machine's queue: create it if missing, start the worker")
    runner.add_argument("name", help="the runner's work queue name, e.g. its host name")
    runner.add_argument("--serve", metavar="HOST:PORT", help="also serve this runner's Tart cache to its peers")
    runner.add_argument("--advertise", metavar="URL", help="the URL peers reach --serve at (default from HOST:PORT)")
    args = parser.parse_args(argv)
    if args.command == "runner":
        ensure_queue(args.name)
        if args.serve:
            return run_worker_and_peer(args.name, args.serve, args.advertise)
        run_worker(args.name)
        return 0
    ensure_infrastructure(args.egress_slots)
    if args.images:
        Variable.set(IMAGES_VARIABLE, json.loads(args.images), overwrite=True)
    deploy(args.checkout.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
