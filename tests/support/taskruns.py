"""Task runs read back from a real Prefect server: what an end-to-end test's pulls really did.

A pull can succeed, or fail with the right one-line message, while some of its task runs ended
in an error nobody expected (the disk-full pull once had 2 task runs end in ``BufferError``).
``unexpected_failures`` finds those: every task run of the flow runs started since a moment
that ended Failed or Crashed, unless its state message matches one the test expects.

Task run states reach the server as events, a moment after the process that ran them is gone:
for a flow run in a final state, its task runs are read until they are final too (bounded). A
flow run killed mid-way stays Running and its task runs too; those count as they are.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import httpx

__all__ = ["FINAL", "flow_runs_since", "task_runs_of", "unexpected_failures"]

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
_BAD = ("FAILED", "CRASHED")
_PAGE = 200


def _post(api_url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row of a ``/filter`` endpoint, page by page."""
    rows: list[dict[str, Any]] = []
    while True:
        response = httpx.post(f"{api_url}{path}", json={**body, "limit": _PAGE, "offset": len(rows)}, timeout=30)
        response.raise_for_status()
        page = response.json()
        rows.extend(page)
        if len(page) < _PAGE:
            return rows


def flow_runs_since(api_url: str, since: datetime) -> list[dict[str, Any]]:
    """Flow runs expected to start at or after ``since`` (an aware datetime)."""
    return _post(api_url, "/flow_runs/filter", {"flow_runs": {"expected_start_time": {"after_": since.isoformat()}}})


def task_runs_of(api_url: str, flow_runs: Iterable[str]) -> list[dict[str, Any]]:
    ids = list(flow_runs)
    if not ids:
        return []
    return _post(api_url, "/task_runs/filter", {"flow_runs": {"id": {"any_": ids}}})


def _state_type(run: dict[str, Any]) -> str | None:
    return run["state"]["type"] if run.get("state") else None


def unexpected_failures(api_url: str, since: datetime, expected: Iterable[str] = (), wait: float = 20) -> list[str]:
    """``name: state: message`` of each task run that ended Failed or Crashed, in a flow run
    started since ``since``, whose state message matches none of the ``expected`` regexes."""
    patterns = [re.compile(p) for p in expected]
    deadline = time.monotonic() + wait
    while True:
        flows = flow_runs_since(api_url, since)
        finished = {f["id"] for f in flows if _state_type(f) in FINAL}
        tasks = task_runs_of(api_url, [f["id"] for f in flows])
        settling = [t for t in tasks if t["flow_run_id"] in finished and _state_type(t) not in FINAL]
        if not settling or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    found = []
    for run in tasks:
        if _state_type(run) in _BAD:
            message = run["state"].get("message") or ""
            if not any(p.search(message) for p in patterns):
                found.append(f"{run['name']}: {run['state']['name']}: {message[:300]}")
    return found
