"""One simulated fleet runner: ``python -m tests.support.scalerunner SPEC.json``.

Started by :mod:`tests.support.fleetsim`, one process per runner, each with its own
``TART_HOME``. It imports everything first, touches ``<result>.ready``, waits for the ``go``
file, so that N runners start their pulls together and the imports (seconds of CPU each) are
not part of what is measured, then pulls one image and writes ``<result>`` (JSON):

- ``cpu``: this process's user+system CPU seconds for the pull alone (all threads);
- ``requests``: ``[method, path, status, seconds]`` for every HTTP request to the Prefect API,
  timed around ``httpx``'s ``send`` as the client saw it (retries count as requests);
- ``flow_run_id``, ``path`` (the VM directory), ``error`` (one line) when it failed.

``mode``: ``prefect`` runs the ``pull-image`` flow in this process against ``PREFECT_API_URL``,
as ``tartflow pull`` does on a runner; ``core`` calls the same core steps (resolve, fetch,
verify, assemble) directly, without Prefect, to measure what Prefect adds on the client.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import httpx

_REQUESTS: list[list[Any]] = []


def _install_timing(api_url: str) -> None:
    """Wrap both httpx clients' ``send``: Prefect's clients subclass them and call it per attempt."""
    prefix = api_url.rstrip("/")

    def wrap(original: Any, is_async: bool) -> Any:
        if is_async:
            async def send_async(self: Any, request: httpx.Request, **kw: Any) -> httpx.Response:
                started = time.perf_counter()
                status = 0
                try:
                    response = await original(self, request, **kw)
                    status = response.status_code
                    return response
                finally:
                    _record(prefix, request, status, time.perf_counter() - started)
            return send_async

        def send(self: Any, request: httpx.Request, **kw: Any) -> httpx.Response:
            started = time.perf_counter()
            status = 0
            try:
                response = original(self, request, **kw)
                status = response.status_code
                return response
            finally:
                _record(prefix, request, status, time.perf_counter() - started)
        return send

    httpx.AsyncClient.send = wrap(httpx.AsyncClient.send, True)  # type: ignore[method-assign]
    httpx.Client.send = wrap(httpx.Client.send, False)  # type: ignore[method-assign]


def _record(prefix: str, request: httpx.Request, status: int, seconds: float) -> None:
    url = str(request.url)
    if url.startswith(prefix):
        _REQUESTS.append([request.method, request.url.path, status, round(seconds, 6)])


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pull_with_prefect(reference: str) -> dict[str, Any]:
    from flows.pull import pull_image

    state = pull_image(reference=reference, insecure=True, return_state=True)  # type: ignore[call-overload]
    out: dict[str, Any] = {"flow_run_id": str(state.state_details.flow_run_id), "state": state.type.value}
    if state.is_completed():
        out["path"] = state.result()
    else:
        out["error"] = (state.message or state.type.value).splitlines()[0]
    return out


def _pull_core(reference: str) -> dict[str, Any]:
    from tartflow import pull as core

    settings = core.PullContext.build(core.PullSettings.from_env(insecure=True))
    resolved = core.resolve(settings, reference)
    if not resolved.installed:
        for digest in resolved.blobs:
            fetched = core.fetch(settings, resolved.reference, resolved.manifest_digest, digest)
            if not fetched.verified:
                core.verify(settings, resolved.reference, resolved.manifest_digest, digest)
    return {"path": core.assemble(settings, resolved.reference, resolved.manifest_digest), "state": "COMPLETED"}


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = Path(spec["result"])
    if spec["mode"] == "prefect":
        _install_timing(os.environ["PREFECT_API_URL"])
        import flows.pull  # noqa: F401 - imported before the start line, not timed
        pull = _pull_with_prefect
    else:
        import tartflow.pull  # noqa: F401
        pull = _pull_core
    result.with_suffix(".ready").touch()
    go = Path(spec["go"])
    deadline = time.monotonic() + spec.get("wait", 600)
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    out: dict[str, Any] = {"started": time.time()}
    cpu0 = _cpu()
    try:
        out.update(pull(spec["reference"]))
    except Exception as exc:  # reported, counted as a failed run by the harness
        out.update(state="CRASHED", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    out.update(cpu=_cpu() - cpu0, ended=time.time(), requests=_REQUESTS)
    _write(result, out)
    # Prefect's clients still send a few requests while the process winds down (the events
    # client, slot releases): the result is written again at exit with those included.
    atexit.register(lambda: _write(result, {**out, "requests": _REQUESTS}))
    return 0 if out.get("state") == "COMPLETED" else 1


def _write(result: Path, out: dict[str, Any]) -> None:
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, result)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
