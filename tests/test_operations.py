"""Issue 14 as a platform engineer sees it: ``tartflow pull --json`` parsed line by line, a
current image answered without Prefect's ephemeral server, the live progress artifact and
the events read back through a real Prefect server's API."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.checks import assert_pulled, fetchable_bytes, vm_dir, wait_for
from tests.support.cli import Tartflow
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage
from tests.support.prefectserver import PrefectServer


def parse_lines(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line is one JSON object with an event and a time; exactly one end, last."""
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines and all(isinstance(o, dict) and "event" in o and "time" in o for o in lines), stdout
    assert [o["event"] for o in lines].count("end") == 1 and lines[-1]["event"] == "end", stdout
    return lines


def test_json_success_has_start_progress_layers_and_end(
    user: Tartflow, proxy: FaultProxy, medium_image: BuiltImage
) -> None:
    proxy.throttle(6_000_000)  # a few seconds, so progress lines appear
    ref = f"{proxy.host}/{medium_image.repository}:{medium_image.tag}"
    result = user.run("pull", "--insecure", "--json", ref)
    assert result.returncode == 0, result.stderr
    lines = parse_lines(result.stdout)
    start = lines[0]
    assert start["event"] == "start" and start["image"] == ref
    assert start["digest"] == medium_image.manifest_digest
    assert start["compressed_bytes"] == fetchable_bytes(medium_image)
    assert start["layers"] == len(medium_image.disk_layers)
    progress = [o for o in lines if o["event"] == "progress"]
    assert progress and all(0 <= o["bytes"] <= o["total_bytes"] for o in progress)
    assert [o["bytes"] for o in progress] == sorted(o["bytes"] for o in progress)
    layers = [o for o in lines if o["event"] == "layer"]
    fetched_blobs = {d["digest"] for d in medium_image.layers} | {medium_image.manifest["config"]["digest"]}
    assert {o["digest"] for o in layers} <= fetched_blobs
    assert sum(o["bytes"].get("registry", 0) for o in layers) == proxy.blob_bytes_served == fetchable_bytes(medium_image)
    assert all(o["source"] == "registry" for o in layers)
    end = lines[-1]
    assert end == {**end, "status": "pulled", "exit_code": 0} and "error" not in end
    assert_pulled(user, proxy.host, medium_image)


def test_json_usage_errors_end_with_exit_code_2(user: Tartflow) -> None:
    for argv in (("pull", "--json", "not a reference!"), ("pull", "--json", "--concurrency", "99", "a.b/c:d")):
        result = user.run(*argv)
        assert result.returncode == 2, result.stderr
        (end,) = parse_lines(result.stdout)
        assert end["status"] == "usage-error" and end["exit_code"] == 2 and end["error_class"] in ("UsageError", "InvalidReferenceError")
        assert "usage:" in result.stderr


@pytest.mark.task_failures(r"RegistryError: manifest .* not found \(404 MANIFEST_UNKNOWN\)")
def test_json_failure_names_the_error(user: Tartflow, proxy: FaultProxy) -> None:
    result = user.run("pull", "--insecure", "--json", "--retry-for", "0", f"{proxy.host}/acme/missing:v1")
    assert result.returncode == 1, result.stderr
    end = parse_lines(result.stdout)[-1]
    assert end["status"] == "failed" and end["exit_code"] == 1
    assert end["error_class"] and "acme/missing" in end["error"]
    assert "Traceback" not in result.stderr


@pytest.mark.task_failures(r"InterruptedPull: pull interrupted")
def test_json_interrupt_ends_with_exit_code_130(
    user: Tartflow, proxy: FaultProxy, medium_image: BuiltImage
) -> None:
    proxy.throttle(1_000_000)
    ref = f"{proxy.host}/{medium_image.repository}:{medium_image.tag}"
    proc = user.start("pull", "--insecure", "--json", ref)
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())  # blocks until the pull resolved the image
    assert first["event"] == "start"
    wait_for(lambda: proxy.blob_bytes_served > 1_000_000, 120, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    end = parse_lines(json.dumps(first) + "\n" + out)[-1]
    assert end["status"] == "interrupted" and end["exit_code"] == 130 and end["error_class"] == "InterruptedPull"


def _flow_runs(prefect_home: Path) -> int:
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        (count,) = db.execute("select count(*) from flow_run").fetchone()
    return int(count)


def test_current_image_is_answered_without_a_flow_run_and_its_access_time_refreshed(
    tmp_path: Path, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    user = Tartflow(tmp_path / "tart", tmp_path / "prefect", api_url=None)  # ephemeral server
    ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    first = user.run("pull", "--insecure", ref)
    assert first.returncode == 0, first.stderr
    runs = _flow_runs(user.prefect_home)
    assert runs == 1
    directory = vm_dir(user, proxy.host, small_image.repository, small_image.manifest_digest)
    os.utime(directory, (1_000_000, directory.stat().st_mtime))
    proxy.reset_counters()
    started = time.monotonic()
    again = user.run("pull", "--insecure", "--json", ref)
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - started < 60
    start, end = parse_lines(again.stdout)
    assert start["digest"] == small_image.manifest_digest and end["status"] == "current"
    assert "is current in Tart's cache" in again.stderr
    assert _flow_runs(user.prefect_home) == runs  # no flow run, no server started
    assert time.time() - directory.stat().st_atime < 120
    assert proxy.blob_bytes_served == 0 and any("/manifests/" in r.path for r in proxy.requests)
    assert_pulled(user, proxy.host, small_image)


def _read_flow_runs(api_url: str, name: str) -> list[dict[str, Any]]:
    response = httpx.post(f"{api_url}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [name]}}}, timeout=30)
    response.raise_for_status()
    runs: list[dict[str, Any]] = response.json()
    return runs


def read_events(api_url: str, names: list[str], resource_id: str | None = None) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"filter": {"event": {"name": names}}, "limit": 50}
    if resource_id:
        body["filter"]["resource"] = {"id": [resource_id]}
    response = httpx.post(f"{api_url}/events/filter", json=body, timeout=30)
    response.raise_for_status()
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def wait_for_events(api_url: str, names: list[str], resource_id: str | None = None, count: int = 1,
                    where: Callable[[dict[str, Any]], bool] = lambda event: True) -> list[dict[str, Any]]:
    """Events stored so far (waiting up to 60 s for ``count`` of them); ``where`` keeps only the
    wanted ones before counting, so an older run's events cannot end the wait early."""
    deadline = time.monotonic() + 60
    while True:
        found = [event for event in read_events(api_url, names, resource_id) if where(event)]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_with_a_server_a_current_image_still_runs_the_flow_named_after_it(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, prefect_server: PrefectServer
) -> None:
    ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    for _ in range(2):
        result = user.run("pull", "--insecure", ref)
        assert result.returncode == 0, result.stderr
    runs = _read_flow_runs(prefect_server.api_url, f"pull {ref}")
    assert len(runs) >= 2 and all(r["state_type"] == "COMPLETED" for r in runs)
    pulled = wait_for_events(prefect_server.api_url, ["tartflow.image.pulled"], f"tartflow.image.{ref}", count=2)
    assert len(pulled) >= 2
    for event in pulled:
        assert event["resource"]["tartflow.image.digest"] == small_image.manifest_digest
        roles = {r["prefect.resource.role"]: r for r in event["related"]}
        assert roles["runner"]["prefect.resource.id"].startswith("tartflow.runner.")
        assert "flow-run" in roles
    assert {e["payload"]["already_current"] for e in pulled} == {True, False}


@pytest.mark.task_failures(r"RegistryError: manifest .* not found \(404 MANIFEST_UNKNOWN\)")
def test_a_failed_pull_emits_pull_failed(user: Tartflow, proxy: FaultProxy, prefect_server: PrefectServer) -> None:
    ref = f"{proxy.host}/acme/absent:v9"
    result = user.run("pull", "--insecure", "--retry-for", "0", ref)
    assert result.returncode == 1
    (failed,) = wait_for_events(prefect_server.api_url, ["tartflow.image.pull-failed"], f"tartflow.image.{ref}")
    assert failed["resource"]["tartflow.image.reference"] == ref
    assert failed["payload"]["error_class"] and "acme/absent" in failed["payload"]["error"]


def _progress_of(api_url: str, run_id: str) -> list[float]:
    response = httpx.post(f"{api_url}/artifacts/filter", json={"artifacts": {
        "flow_run_id": {"any_": [run_id]}, "type": {"any_": ["progress"]}}}, timeout=30)
    response.raise_for_status()
    return [float(a["data"]) for a in response.json()]


def test_progress_artifact_rises_while_a_throttled_pull_runs(
    user: Tartflow, proxy: FaultProxy, medium_image: BuiltImage, prefect_server: PrefectServer
) -> None:
    proxy.throttle(300_000)  # per response, four in flight: 11 MB in about ten seconds
    ref = f"{proxy.host}/{medium_image.repository}:{medium_image.tag}"
    proc = user.start("pull", "--insecure", ref)
    run_id: str | None = None
    seen: list[float] = []
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if run_id is None:
            runs = [r for r in _read_flow_runs(prefect_server.api_url, f"pull {ref}") if r["state_type"] == "RUNNING"]
            run_id = runs[0]["id"] if runs else None
        else:
            values = _progress_of(prefect_server.api_url, run_id)
            if values and 0 < values[0] < 100 and (not seen or values[0] != seen[-1]):
                seen.append(values[0])
        time.sleep(0.3)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert run_id is not None
    assert len(seen) >= 2 and seen == sorted(seen), seen
    assert _progress_of(prefect_server.api_url, run_id) == [100.0]
    assert_pulled(user, proxy.host, medium_image)
