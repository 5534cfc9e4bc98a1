"""Prefect's cache does the work it is there for: a restarted pull gets every layer an earlier
run finished back as ``Cached`` (task states read back from the Prefect server) and moves no
byte of them; once the outputs are gone, nothing counts as cached."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.checks import assert_pulled, done_layers, fetchable_bytes
from tests.support.cli import Tartflow
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage
from tests.support.prefectserver import PrefectServer


def _post(server: PrefectServer, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = httpx.post(f"{server.api_url}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def flow_runs_of(server: PrefectServer, reference: str) -> set[str]:
    runs = _post(server, "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 200})
    return {r["id"] for r in runs if r["parameters"].get("reference") == reference}


def step_states(server: PrefectServer, flow_run: str, step: str, expected: int) -> dict[str, str]:
    """{blob digest: state name} of the ``step`` task runs of ``flow_run``; waits (bounded) for
    the server to have recorded ``expected`` of them in a final state (states arrive as events)."""
    deadline = time.monotonic() + 60
    while True:
        runs = _post(server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run]}}, "limit": 200})
        final = {r["name"].removeprefix(f"{step}-"): r["state"]["name"] for r in runs
                 if r["name"].startswith(f"{step}-") and r["state"]
                 and r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")}
        if len(final) >= expected or time.monotonic() > deadline:
            return final
        time.sleep(0.5)


def _kill_at_half(user: Tartflow, proxy: FaultProxy, image: BuiltImage, ref: str) -> set[str]:
    """Start a pull, SIGKILL it at about half its bytes; returns the disk layers verified by then.

    The kill waits for a moment when no layer has finished for 0.3 s: Prefect writes a task's
    result record just after the core marks its layer done, and a kill inside those few
    milliseconds would leave a finished layer without a record (it is then fetched from disk,
    not from the cache: correct, but not what this test is about).
    """
    total = fetchable_bytes(image)
    proxy.throttle(1_000_000)
    proc = user.start("pull", "--insecure", ref)
    seen: set[int] = set()
    changed = time.monotonic()
    deadline = changed + 120
    while True:
        now, done = time.monotonic(), done_layers(user, image)
        if done != seen:
            seen, changed = done, now
        elif proxy.blob_bytes_served >= total * 0.5 and now - changed >= 0.3:
            break
        if proc.poll() is not None or now > deadline:
            proc.kill()
            _out, err = proc.communicate()
            raise AssertionError(f"the pull ended before half its bytes: {err[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=10)
    proxy.wait_idle(10)
    finished = {image.disk_layers[i]["digest"] for i in done_layers(user, image)}
    assert finished and len(finished) < len(image.disk_layers), finished
    return finished


@pytest.mark.parametrize("collected", [False, True], ids=["restart", "after-gc"])
def test_a_restart_gets_finished_layers_from_the_cache_and_never_a_vanished_one(
    user: Tartflow, proxy: FaultProxy, medium_image: BuiltImage, prefect_server: PrefectServer, collected: bool
) -> None:
    ref = f"{proxy.host}/{medium_image.repository}:{medium_image.tag}"
    finished = _kill_at_half(user, proxy, medium_image, ref)
    before = flow_runs_of(prefect_server, ref)
    if collected:  # the staging VM, its blobs and partials deleted, as `tartflow gc` does for abandoned pulls
        gc = user.run("gc", "--older-than", "0")
        assert gc.returncode == 0 and "staging VM" in gc.stdout, gc.stdout + gc.stderr
    proxy.clear_faults()
    proxy.reset_counters()
    result = user.run("pull", "--insecure", ref)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, medium_image)
    (second,) = flow_runs_of(prefect_server, ref) - before
    disk = {layer["digest"] for layer in medium_image.disk_layers}
    blobs = {layer["digest"] for layer in medium_image.manifest["layers"]}
    states = step_states(prefect_server, second, "fetch-layer", len(blobs))
    assert disk <= set(states), states
    served = {r.path.rsplit("/", 1)[-1] for r in proxy.requests if "/blobs/" in r.path and r.bytes_sent}
    if not collected:
        assert {d: states[d] for d in finished} == dict.fromkeys(finished, "Cached")
        assert not served & finished  # not a byte of a cached layer moved
        assert all(states[d] != "Cached" for d in disk - finished)  # unfinished layers ran
    else:
        assert "Cached" not in states.values(), states
        verify = step_states(prefect_server, second, "verify-digest", 1)
        assert "Cached" not in verify.values(), verify
        assert disk <= served and proxy.blob_bytes_served == fetchable_bytes(medium_image)
