"""No signed URL leaves a pull: a run that really is redirected to a CDN, and fails there,
names the CDN URL (so its query could leak), yet no query string reaches the terminal, the
flow run's logs or any record on the Prefect server. (The core's reports and logs during a
redirected pull are checked in test_safety.py.)"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pytest

from tests.support.cli import Tartflow
from tests.support.faultproxy import CDN_PATH, FaultProxy
from tests.support.imagebuilder import BuiltImage
from tests.support.prefectserver import PrefectServer

#: A signed URL's query parameters (the fault proxy signs as Azure does: ``sig``, ``se``).
_SIGNED = re.compile(r"[?&](sig|se)=")


def _post(server: PrefectServer, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = httpx.post(f"{server.api_url}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


@pytest.mark.task_failures(r"RetriesExhaustedError: blob .* answered 403")
def test_a_pull_failing_at_the_cdn_leaks_no_signed_url_to_output_logs_or_prefect(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, prefect_server: PrefectServer
) -> None:
    """Every signed URL the registry hands out is refused by the CDN, so the pull fails with
    the CDN's error, which names the CDN URL: in its last line, in the failed task's state on
    the Prefect server and in the flow run's logs."""
    proxy.cdn_redirects(ttl=60)
    proxy.status_burst(403, 1000, path_regex=CDN_PATH)
    ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    result = user.run("pull", "--insecure", "--retry-for", "3s", ref)
    assert result.returncode == 1, result.stderr
    cdn = [r for r in proxy.requests if r.path.startswith("/cdn/")]
    assert cdn and all("sig=" in r.path and r.status == 403 for r in cdn)  # really redirected, signed

    runs = [r for r in _post(prefect_server, "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 50})
            if r["parameters"].get("reference") == ref]
    assert len(runs) == 1
    run_id = runs[0]["id"]
    deadline = time.monotonic() + 60
    while True:  # task states and logs reach the server as events and batches: wait (bounded)
        tasks = _post(prefect_server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200})
        failed = [t["state"]["message"] or "" for t in tasks if t["state"] and t["state"]["type"] == "FAILED"]
        if any("/cdn/" in m for m in failed) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert any("/cdn/" in m for m in failed), failed  # Prefect recorded the CDN error ...
    logs = _post(prefect_server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    flow_run = httpx.get(f"{prefect_server.api_url}/flow_runs/{run_id}", timeout=30).json()
    records = json.dumps({"flow_run": flow_run, "logs": logs, "task_runs": tasks})
    assert not _SIGNED.search(records), [m for m in failed if _SIGNED.search(m)][:3]  # ... without the query
    output = result.stdout + result.stderr  # checked last, so a leak shows in Prefect's records first
    assert "/cdn/" in output and "Traceback" not in output  # the URL is named ...
    assert not _SIGNED.search(output), output[-2000:]  # ... without its query
