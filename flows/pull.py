"""The ``pull-image`` flow: fetch-manifest, then fetch-layer per blob (at most ``concurrency``
in flight) with verify-digest submitted as each fetch completes, then assemble-vm.

Restarting the flow after any failure skips every finished step through the tasks' content
keyed caches and resumes a half-fetched blob where it stopped.
"""

from __future__ import annotations

import concurrent.futures
from typing import Annotated, Any

from prefect import flow
from prefect.futures import PrefectConcurrentFuture, PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from tartflow.progress import reporter
from tartflow.pull import PullSettings
from tasks.pull import assemble_vm, fetch_layer, fetch_manifest, verify_digest

__all__ = ["pull_image"]

#: Threads for task runs: fetches are bounded by ``concurrency`` below, verifies ride along.
_POOL = 32


@flow(name="pull-image", task_runner=ThreadPoolTaskRunner(max_workers=_POOL), log_prints=False)  # type: ignore[arg-type]
def pull_image(
    reference: Annotated[str, Field(description="Tart image, e.g. ghcr.io/cirruslabs/macos-sequoia-base:latest")],
    insecure: Annotated[bool, Field(description="Plain HTTP to the registry, as `tart pull --insecure`")] = False,
    concurrency: Annotated[int, Field(ge=1, le=32, description="Layer downloads in flight")] = 4,
    retry_for: Annotated[float, Field(ge=0, description="Seconds to keep retrying temporary failures")] = 1800,
) -> str:
    """Pull ``reference`` into Tart's cache on this machine; returns the VM's directory."""
    settings = PullSettings.from_env(insecure=insecure, retry_for=retry_for).__dict__
    resolved = fetch_manifest(settings, reference)
    digest = resolved["manifest_digest"]
    if not resolved["installed"]:
        reporter().plan(resolved["compressed_size"], len(resolved["blobs"]))
        _fetch_and_verify(settings, resolved["reference"], digest, resolved["blobs"], concurrency)
    return assemble_vm(settings, resolved["reference"], digest)


def _fetch_and_verify(
    settings: dict[str, Any], reference: str, manifest_digest: str, blobs: list[str], concurrency: int
) -> None:
    pending = list(blobs)
    fetching: dict[concurrent.futures.Future[Any], tuple[str, PrefectFuture[Any]]] = {}
    verifying: list[PrefectFuture[Any]] = []
    while pending or fetching:
        while pending and len(fetching) < concurrency:
            digest = pending.pop(0)
            future = fetch_layer.submit(settings, reference, manifest_digest, digest)
            assert isinstance(future, PrefectConcurrentFuture)  # the thread-pool runner's futures
            fetching[future.wrapped_future] = (digest, future)
        done, _ = concurrent.futures.wait(list(fetching), return_when=concurrent.futures.FIRST_COMPLETED)
        for wrapped in done:
            digest, future = fetching.pop(wrapped)
            fetched = future.result()  # raises the task's error: the flow fails with it
            verifying.append(verify_digest.submit(settings, reference, manifest_digest, digest, fetched))
    for future in verifying:
        future.result()
