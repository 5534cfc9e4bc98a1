"""No signed URL leaves a pull: a run that really is redirected to a CDN, and fails there once,
names the CDN URL (so its query could leak) in what it logs, yet no query string reaches the
terminal, the flow run's logs or any record on the Prefect server."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx

from tests.checks import assert_pulled
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


def test_a_redirected_pull_leaks_no_signed_url_to_output_logs_or_prefect(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, prefect_server: PrefectServer
) -> None:
    proxy.cdn_redirects(ttl=60)
    proxy.status_burst(403, 1, path_regex=CDN_PATH)  # the first signed URL refused: retried
    ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    result = user.run("pull", "--insecure", ref)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    cdn = [r for r in proxy.requests if r.path.startswith("/cdn/")]
    assert cdn and all("sig=" in r.path for r in cdn) and cdn[0].status == 403  # really redirected
    output = result.stdout + result.stderr
    assert not _SIGNED.search(output), output[-2000:]

    runs = [r for r in _post(prefect_server, "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 50})
            if r["parameters"].get("reference") == ref]
    assert len(runs) == 1
    run_id = runs[0]["id"]
    deadline = time.monotonic() + 60
    while True:  # logs reach the server in batches: wait (bounded) for the retry's line
        logs = _post(prefect_server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
        named = [log["message"] for log in logs if "/cdn/" in log["message"]]
        if named or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert named, "the CDN failure was not logged to the flow run: nothing here could show a leak"
    tasks = _post(prefect_server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200})
    records = json.dumps({"flow_run": runs[0], "logs": logs, "task_runs": tasks})
    assert not _SIGNED.search(records), [m for m in named if _SIGNED.search(m)][:3]
