"""Task runs read back from a real Prefect server: what an end-to-end test's pulls really did.

A pull can succeed, or fail with the right one-line message, while some of its task runs ended
in an error nobody expected (the disk-full pull once had 2 task runs end in ``BufferError``).
``unexpected_failures`` finds those: every task run, in a flow run the server did not have
before the test, that ended Failed or Crashed, unless its state message matches one the test
expects.

Task run states reach the server as events, a moment after the process that ran them is gone:
for a flow run in a final state, its task runs are read until they are final too (bounded). A
flow run killed mid-way stays Running and its task runs too; those count as they are.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

import httpx

__all__ = ["FINAL", "flow_run_ids", "task_runs_of", "unexpected_failures"]

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


def flow_run_ids(api_url: str) -> set[str]:
    """Every flow run the server knows: taken before a test, so its own are told apart (a
    flow run's times can be set after it was created, so a time filter is not enough)."""
    return {run["id"] for run in _post(api_url, "/flow_runs/filter", {})}


def task_runs_of(api_url: str, flow_runs: Iterable[str]) -> list[dict[str, Any]]:
    ids = list(flow_runs)
    if not ids:
        return []
    return _post(api_url, "/task_runs/filter", {"flow_runs": {"id": {"any_": ids}}})


def _state_type(run: dict[str, Any]) -> str | None:
    return run["state"]["type"] if run.get("state") else None


def unexpected_failures(api_url: str, before: set[str], expected: Iterable[str] = (), wait: float = 20) -> list[str]:
    """``name: state: message`` of each task run that ended Failed or Crashed, in a flow run
    not among ``before``, whose state message matches none of the ``expected`` regexes."""
    patterns = [re.compile(p) for p in expected]
    deadline = time.monotonic() + wait
    while True:
        flows = [f for f in _post(api_url, "/flow_runs/filter", {}) if f["id"] not in before]
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
