"""The ``prewarm-fleet`` flow: pull images onto every runner of the fleet, in parallel.

Each runner is a Prefect process worker serving its own work queue of the ``mac-runners`` pool
(with its own ``TART_HOME``); this flow runs on the ``control`` queue and starts one
``pull-image/on-demand`` run per runner and image on that runner's queue, waits for all, and
fails naming the runners and images that failed. Runners default to every queue other than
``control`` polled by a worker in the last 10 minutes; images default to the Prefect Variable
``tartflow-images`` (a JSON list of references), which is what the nightly deployment uses.

When runners serve their caches to each other (``deployments.fleet runner NAME --serve``), the
pulls are spread instead of started at once: ``seeds`` runners pull from upstream, and each
runner that finishes feeds the next ones (flows/peering.py), so the image crosses the internet
about ``seeds`` times rather than once per runner.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.variables import Variable
from pydantic import Field

from flows import events
from flows.params import Concurrency, Mirrors, RetryFor
from flows.peering import Spread, registered_peers, spread_order
from flows.prewarm_prune import prune_runners
from flows.progress import PrewarmTable

__all__ = ["CONTROL_QUEUE", "IMAGES_VARIABLE", "POOL", "PULL_DEPLOYMENT", "live_runners", "prewarm_fleet"]

PULL_DEPLOYMENT = "pull-image/on-demand"
POOL = "mac-runners"
CONTROL_QUEUE = "control"
IMAGES_VARIABLE = "tartflow-images"
LIVE_WITHIN = timedelta(minutes=10)
_PAGE = 200  # flow runs per filtered read: Prefect's default API page size


def live_runners(pool: str = POOL) -> list[str]:
    """Queues of ``pool`` (other than ``control``) that a worker polled within 10 minutes."""
    cutoff = datetime.now(timezone.utc) - LIVE_WITHIN
    with get_client(sync_client=True) as client:
        queues = client.read_work_queues(work_pool_name=pool)
    return sorted(q.name for q in queues if q.name != CONTROL_QUEUE and q.last_polled and q.last_polled >= cutoff)


@flow(name="prewarm-fleet", log_prints=False)
def prewarm_fleet(
    images: list[str] | None = None,
    runners: list[str] | None = None,
    insecure: bool = False,
    concurrency: Concurrency = 4,
    retry_for: RetryFor = 1800,
    pool: str = POOL,
    mirrors: Mirrors = None,
    credentials_block: str | None = None,
    prune_older_than: RetryFor | None = None,
    seeds: Annotated[int, Field(ge=1)] = 1,
) -> dict[str, str]:
    """Pull images onto runners of the fleet in parallel; returns {"runner image": final state}.

    Args:
        images: Tart images to pull; empty: the JSON list in the Prefect Variable tartflow-images.
        runners: Runner work queues to fill; empty: every queue of the pool with a worker seen
            in the last 10 minutes.
        insecure: Plain HTTP to the registry, as `tart pull --insecure`.
        concurrency: Layer downloads in flight on each runner (1-32).
        retry_for: Seconds each pull keeps retrying temporary failures such as egress limits.
        pool: The work pool whose queues are the runners.
        mirrors: Pull-through mirrors per registry host, tried in order,
            e.g. {"ghcr.io": ["http://mirror.lan:5000"]}.
        credentials_block: Name of a Prefect Secret block holding registry credentials,
            passed to every pull.
        prune_older_than: Seconds; when set, after its pulls each runner drops cached images
            that are not in this run's image list and were not accessed within that time
            (604800 = a week). Off by default.
        seeds: Runners that pull each image from upstream first when runners serve each
            other; every runner that finishes then feeds the next ones.
    """
    logger = get_run_logger()
    images = images or list(Variable.get(IMAGES_VARIABLE, default=[]) or [])
    if not images:
        raise ValueError(f"no images to prewarm: pass images or set the Prefect Variable {IMAGES_VARIABLE!r}")
    runners = runners or live_runners(pool)
    if not runners:
        raise ValueError(f"no live runners in work pool {pool!r}: start a worker per runner (see README)")
    logger.info("prewarming %d image(s) on %d runner(s): %s", len(images), len(runners), ", ".join(runners))
    parameters = {"insecure": insecure, "concurrency": concurrency, "retry_for": retry_for, "mirrors": mirrors,
                  "credentials_block": credentials_block}
    serving = {runner: url for runner, url in registered_peers().items() if runner in runners}
    if serving:
        logger.info("runners serving peers: %s; %d seed(s) per image pull from upstream", ", ".join(serving), seeds)
        finals = _spread(images, spread_order(runners, serving), serving, seeds, parameters)
    else:
        started = {(runner, image): _start(runner, image, parameters) for runner in runners for image in images}
        finals = _wait(started)
    _publish(finals)
    if prune_older_than is not None:  # issue 13: retention after the pulls, per runner
        finals.update(prune_runners(runners, images, prune_older_than))
    events.prewarm_completed(str(FlowRunContext.get().flow_run.id),  # type: ignore[union-attr]
                             {key: state for key, (state, _) in finals.items()})
    failed = [f"{runner} ({image}: {state})" for (runner, image), (state, _) in finals.items() if state != "COMPLETED"]
    if failed:
        raise RuntimeError(f"prewarm failed on {len(failed)} of {len(finals)}: " + "; ".join(failed))
    return {f"{runner} {image}": state for (runner, image), (state, _) in finals.items()}


def _start(runner: str, image: str, parameters: dict[str, Any]) -> UUID:
    """A pull-image run on ``runner``'s queue, not waited for (``timeout=0``)."""
    run = run_deployment(PULL_DEPLOYMENT, parameters={"reference": image, **parameters},
                         work_queue_name=runner, timeout=0, flow_run_name=f"{runner}: {image}")
    return cast(FlowRun, run).id


def _spread(
    images: list[str], runners: list[str], serving: dict[str, str], seeds: int, parameters: dict[str, Any],
    poll: float = 2.0,
) -> dict[tuple[str, str], tuple[str, float]]:
    """Start pulls as peers become available (flows/peering.py); returns what _wait does."""
    spreads = {image: Spread(image, list(runners), seeds, serving) for image in images}
    running: dict[tuple[str, str], UUID] = {}
    finals: dict[tuple[str, str], tuple[str, float]] = {}
    with get_client(sync_client=True) as client:
        while True:
            for image, spread in spreads.items():
                for runner, peers in spread.next_starts():
                    running[(runner, image)] = _start(runner, image, {**parameters, "peers": peers or None})
            if not running:
                return finals
            time.sleep(poll)
            for key, run_id in list(running.items()):
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    del running[key]
                    finals[key] = (run.state.type.value, run.total_run_time.total_seconds())
                    spreads[key[1]].finished(key[0], finals[key][0] == "COMPLETED")


def _wait(runs: dict[tuple[str, str], UUID], poll: float = 2.0) -> dict[tuple[str, str], tuple[str, float]]:
    """Poll until every flow run is final; returns (state name, run seconds) per run.

    Each poll is one filtered read per 200 runs still waiting (their states feed the live
    table) plus one read of their progress artifacts, so its request count does not grow with
    the fleet: reading each run by id
    was a request per runner every ``poll`` seconds, 500 requests/s for 1,000 runners
    (docs/scale.md).
    """
    key_of = {run_id: key for key, run_id in runs.items()}
    finals: dict[tuple[str, str], tuple[str, float]] = {}
    table = PrewarmTable(list(runs))
    states: dict[tuple[str, str], tuple[str, float | None]] = {}
    with get_client(sync_client=True) as client:
        while len(finals) < len(runs):
            waiting = [run_id for key, run_id in runs.items() if key not in finals]
            for start in range(0, len(waiting), _PAGE):
                page = FlowRunFilter(id=FlowRunFilterId(any_=waiting[start:start + _PAGE]))
                for run in client.read_flow_runs(flow_run_filter=page, limit=_PAGE):
                    key = key_of[run.id]
                    states[key] = (run.state.type.value if run.state else "SCHEDULED", None)
                    if run.state is not None and run.state.is_final():
                        finals[key] = (run.state.type.value, run.total_run_time.total_seconds())
                        states[key] = finals[key]
            table.update(client, runs, states, len(finals))
            if len(finals) < len(runs):
                time.sleep(poll)
    return finals


def _publish(finals: dict[tuple[str, str], tuple[str, float]]) -> None:
    """The final table: the latest version of the key, after the live one the wait loop kept."""
    rows = [{"runner": runner, "image": image, "state": state, "seconds": round(seconds, 1)}
            for (runner, image), (state, seconds) in sorted(finals.items())]
    ok = sum(1 for state, _ in finals.values() if state == "COMPLETED")
    create_table_artifact(table=rows, key="tartflow-prewarm",
                          description=f"prewarm: {ok} of {len(finals)} pulls completed")
