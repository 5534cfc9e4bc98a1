"""Prefect events a fleet's automations can react to (README "Events").

- ``tartflow.image.pulled`` / ``tartflow.image.pull-failed``: resource
  ``tartflow.image.<reference>`` (labels ``tartflow.image.reference`` and, once resolved,
  ``tartflow.image.digest``); related: the runner's work queue (``prefect.work-queue.<id>``,
  role ``work-queue``) when the run came from a deployment, and the machine
  (``tartflow.runner.<host>``, role ``runner``). Prefect adds the flow run, flow and deployment.
- ``tartflow.prewarm.completed``: resource ``tartflow.prewarm.<flow run id>``, payload with the
  counts (``pulls``, ``completed``, ``failed``) and the runners and images.

Emitting never fails a run: an event that cannot be sent is logged and dropped.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from prefect.context import FlowRunContext
from prefect.events import emit_event

__all__ = ["PREWARM_COMPLETED", "PULLED", "PULL_FAILED", "image_pulled", "prewarm_completed", "pull_failed"]

PULLED = "tartflow.image.pulled"
PULL_FAILED = "tartflow.image.pull-failed"
PREWARM_COMPLETED = "tartflow.prewarm.completed"
log = logging.getLogger("tartflow")


def image_resource(reference: str, digest: str | None) -> dict[str, str]:
    resource = {"prefect.resource.id": f"tartflow.image.{reference}", "prefect.resource.name": reference,
                "tartflow.image.reference": reference}
    if digest:
        resource["tartflow.image.digest"] = digest
    return resource


def runner_resources() -> list[dict[str, str]]:
    """The work queue this run was taken from (a fleet runner), and this machine."""
    host = socket.gethostname()
    related = [{"prefect.resource.id": f"tartflow.runner.{host}", "prefect.resource.role": "runner",
                "prefect.resource.name": host}]
    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx else None
    if run is not None and run.work_queue_id is not None:
        related.append({"prefect.resource.id": f"prefect.work-queue.{run.work_queue_id}",
                        "prefect.resource.role": "work-queue",
                        "prefect.resource.name": run.work_queue_name or ""})
    return related


def _emit(event: str, resource: dict[str, str], related: list[dict[str, str]], payload: dict[str, Any]) -> None:
    try:
        emit_event(event, resource=resource, related=related, payload=payload)
    except Exception as exc:
        log.warning("event %s not sent: %s", event, exc)


def image_pulled(reference: str, digest: str, *, fetched: int, seconds: float, already_current: bool) -> None:
    _emit(PULLED, image_resource(reference, digest), runner_resources(),
          {"digest": digest, "fetched_bytes": fetched, "seconds": round(seconds, 2),
           "already_current": already_current})


def pull_failed(reference: str, digest: str | None, error: BaseException) -> None:
    _emit(PULL_FAILED, image_resource(reference, digest), runner_resources(),
          {"digest": digest, "error_class": type(error).__name__, "error": str(error)[:2000]})


def prewarm_completed(run_id: str, finals: dict[tuple[str, str], str]) -> None:
    completed = sum(1 for state in finals.values() if state == "COMPLETED")
    _emit(PREWARM_COMPLETED, {"prefect.resource.id": f"tartflow.prewarm.{run_id}",
                              "prefect.resource.name": "prewarm-fleet"}, [],
          {"pulls": len(finals), "completed": completed, "failed": len(finals) - completed,
           "runners": sorted({runner for runner, _ in finals}), "images": sorted({image for _, image in finals}),
           "failures": [f"{runner} {image}: {state}" for (runner, image), state in sorted(finals.items())
                        if state != "COMPLETED"]})
