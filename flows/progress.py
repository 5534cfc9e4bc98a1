"""Live progress in Prefect's UI.

``PullProgress``: while a ``pull-image`` run works, a progress artifact (key
``tartflow-pull-progress``) shows the percent of bytes, and its description a short markdown
table: rate, ETA, disk layers verified, bytes per source. It counts beside the process's own
view (a ``Tee``), and a background thread publishes at most every ``interval`` seconds and only
when something moved, so the download threads never wait on the API; a failed update is logged
and skipped, never fatal to the pull.

``PrewarmTable``: the ``prewarm-fleet`` run's table artifact (key ``tartflow-prewarm``), runner x
image with each child run's state and percent (read from the child's progress artifact),
updated in place from the flow's wait loop.
"""

from __future__ import annotations

import json
import logging
import threading
from types import TracebackType
from typing import Any, cast
from uuid import UUID

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

from tartflow.progress import Reporter, reporter, set_reporter
from tartflow.tally import Snapshot, Tally, Tee

__all__ = ["PREWARM_KEY", "PROGRESS_KEY", "PrewarmTable", "PullProgress", "describe"]

PROGRESS_KEY = "tartflow-pull-progress"
PREWARM_KEY = "tartflow-prewarm"
log = logging.getLogger("tartflow")


class PullProgress(Tally):
    """A context manager around a pull: counts its events and keeps the artifact current."""

    def __init__(self, interval: float = 2.0) -> None:
        super().__init__()
        self.interval = interval
        self.artifact_id: UUID | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tartflow-progress-artifact", daemon=True)
        self._previous: Reporter | None = None
        self._published = -1

    def __enter__(self) -> PullProgress:
        try:
            self.artifact_id = cast(UUID, create_progress_artifact(0.0, key=PROGRESS_KEY, description="resolving the image"))
        except Exception as exc:  # the UI's view is secondary: the pull goes on without it
            log.warning("progress artifact not created: %s", exc)
        self._previous = set_reporter(Tee(reporter(), self))
        if self.artifact_id is not None:
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._previous is not None:
            set_reporter(self._previous)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.artifact_id is not None:
            self.publish(final="done" if kind is None else f"stopped: {type(exc).__name__}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.changes != self._published:
                self.publish()

    def publish(self, final: str | None = None) -> None:
        assert self.artifact_id is not None
        self._published = self.changes
        snap = self.snapshot()
        percent = 100.0 if final == "done" else snap.percent
        try:
            update_progress_artifact(self.artifact_id, percent, description=describe(snap, final))
        except Exception as exc:
            log.debug("progress artifact not updated: %s", exc)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def describe(snap: Snapshot, final: str | None = None) -> str:
    """Markdown for the progress artifact's description."""
    head = f"**{snap.reference or 'image'}** `{snap.digest[:19]}`" if snap.digest else "resolving the image"
    rows = [
        ("status", final or "pulling"),
        ("bytes", f"{_mb(snap.done)} of {_mb(snap.total)} ({snap.percent:.1f} %)"),
        ("rate", f"{snap.rate / 1e6:.1f} MB/s"),
        ("ETA", "-" if final else _eta(snap.eta)),
        ("disk layers verified", f"{snap.layers_done}/{snap.layers}"),
        ("blobs done", str(snap.blobs_done)),
        *((f"from {source}", _mb(nbytes)) for source, nbytes in sorted(snap.sources.items())),
    ]
    return "\n".join([head, "", "| | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)])


class PrewarmTable:
    """The prewarm run's live table; ``update`` is called from the flow's wait loop."""

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        self.keys = sorted(keys)
        self.artifact_id: UUID | None = None
        try:
            self.artifact_id = cast(UUID, create_table_artifact(
                table=self._rows({}), key=PREWARM_KEY, description=f"prewarm: 0 of {len(keys)} pulls done"))
        except Exception as exc:
            log.warning("prewarm table not created: %s", exc)

    def _rows(self, status: dict[tuple[str, str], tuple[str, float, float | None]]) -> list[dict[str, Any]]:
        rows = []
        for key in self.keys:
            state, percent, seconds = status.get(key, ("SCHEDULED", 0.0, None))
            rows.append({"runner": key[0], "image": key[1], "state": state, "percent": round(percent, 1),
                         "seconds": None if seconds is None else round(seconds, 1)})
        return rows

    def update(self, client: SyncPrefectClient, runs: dict[tuple[str, str], UUID],
               states: dict[tuple[str, str], tuple[str, float | None]], done: int) -> None:
        """``states``: per run, its state name and run seconds once final (else None)."""
        if self.artifact_id is None:
            return
        try:
            percents = child_percents(client, list(runs.values()))
            status = {key: (state, 100.0 if state == "COMPLETED" else percents.get(runs[key], 0.0), seconds)
                      for key, (state, seconds) in states.items()}
            client.update_artifact(self.artifact_id, ArtifactUpdate(
                data=json.dumps(self._rows(status)),
                description=f"prewarm: {done} of {len(self.keys)} pulls done"))
        except Exception as exc:
            log.debug("prewarm table not updated: %s", exc)


def child_percents(client: SyncPrefectClient, run_ids: list[UUID]) -> dict[UUID, float]:
    """The latest progress percent of each of ``run_ids`` (runs not started yet have none)."""
    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=run_ids), type=ArtifactFilterType(any_=["progress"])))
    return {a.flow_run_id: float(a.data) for a in artifacts
            if a.flow_run_id is not None and isinstance(a.data, (int, float))}
