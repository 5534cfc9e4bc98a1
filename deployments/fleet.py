"""Prepare a Prefect server for a tartflow fleet, then deploy from this checkout. Idempotent.

    python -m deployments.fleet setup [--egress-slots 8] [--images JSON] [--checkout DIR]
    python -m deployments.fleet runner NAME     # on each Mac runner (launchd keeps it running)

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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
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
    args = parser.parse_args(argv)
    if args.command == "runner":
        ensure_queue(args.name)
        run_worker(args.name)
        return 0
    ensure_infrastructure(args.egress_slots)
    if args.images:
        Variable.set(IMAGES_VARIABLE, json.loads(args.images), overwrite=True)
    deploy(args.checkout.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
