"""``prewarm-fleet``'s retention step: one ``prune-cache/on-demand`` run per runner, after the
pulls, keeping the run's images; what went on each runner is gathered from those runs' artifacts
into one table artifact of the prewarm run (key ``tartflow-prewarm-pruned``)."""

from __future__ import annotations

import json
import time
from typing import Any, cast
from uuid import UUID

from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from flows.prune import PRUNE_ARTIFACT

__all__ = ["PRUNED_ARTIFACT", "PRUNE_DEPLOYMENT", "prune_runners"]

PRUNE_DEPLOYMENT = "prune-cache/on-demand"
PRUNED_ARTIFACT = "tartflow-prewarm-pruned"


def prune_runners(runners: list[str], images: list[str], older_than: float) -> dict[tuple[str, str], tuple[str, float]]:
    """Prune every runner; returns {(runner, "prune"): (final state, seconds)} like the pulls'."""
    runs = {}
    for runner in runners:
        run = run_deployment(PRUNE_DEPLOYMENT, parameters={"older_than": older_than, "keep": images},
                             work_queue_name=runner, timeout=0, flow_run_name=f"{runner}: prune")
        runs[runner] = cast(FlowRun, run).id
    finals = _wait(runs)
    rows = [row for runner, run_id in sorted(runs.items()) for row in _pruned(runner, run_id)]
    create_table_artifact(table=rows or [{"runner": "(all)", "image": "(nothing pruned)", "size GB": 0}],
                          key=PRUNED_ARTIFACT,
                          description=f"pruned {len(rows)} cached image(s) not accessed within {older_than:.0f} s")
    return {(runner, "prune"): finals[runner] for runner in runners}


def _wait(runs: dict[str, UUID], poll: float = 2.0) -> dict[str, tuple[str, float]]:
    finals: dict[str, tuple[str, float]] = {}
    with get_client(sync_client=True) as client:
        while len(finals) < len(runs):
            for key, run_id in runs.items():
                run = client.read_flow_run(run_id)
                if key not in finals and run.state is not None and run.state.is_final():
                    finals[key] = (run.state.type.value, run.total_run_time.total_seconds())
            if len(finals) < len(runs):
                time.sleep(poll)
    return finals


def _pruned(runner: str, run_id: UUID) -> list[dict[str, Any]]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=[PRUNE_ARTIFACT])))
    rows: list[dict[str, Any]] = []
    for artifact in artifacts:
        data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
        for row in data or []:
            if isinstance(row, dict) and row.get("digest"):
                rows.append({"runner": runner, **row})
    return rows
