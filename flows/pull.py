"""The ``pull-image`` flow: fetch-manifest, then fetch-layer per blob (at most ``concurrency``
in flight) with verify-digest submitted as each fetch completes, then assemble-vm, then a table
artifact of what each blob cost.

verify-digest runs for each blob its fetch did not already verify into the staging VM: the
config, the NVRAM, a blob several disk layers share, a blob found in the store. A disk layer
decoded as it downloads is checked against both digests by its fetch-layer run, and a task run
that would do nothing costs the Prefect server more than the check itself.

Restarting the flow after any failure submits every blob again: a fetch-layer or verify-digest
whose output is still on disk comes back ``Cached`` from Prefect's content-keyed cache (see
tasks/pull.py); one whose output has gone (blob collected, staging VM deleted) is submitted
with ``refresh_cache=True`` and runs, resuming a half-fetched blob where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext
from prefect.futures import PrefectConcurrentFuture, PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from flows import events
from flows.params import Concurrency, Mirrors, RetryFor
from flows.progress import PullProgress
from flows.secrets import use_peer_token_block, use_secret_block
from tartflow import cowbase
from tartflow import pull as core
from tartflow.fetch import FetchResult
from tartflow.progress import reporter
from tartflow.pull import PullContext, PullSettings, ResolvedImage
from tartflow.reference import parse_reference
from tasks.pull import assemble_vm, fetch_layer, fetch_manifest, verify_digest

__all__ = ["EGRESS_LIMIT", "pull_image", "run_name", "sources"]

#: Threads for task runs: fetches are bounded by ``concurrency`` below, verifies ride along.
_POOL = 32
#: The Prefect global concurrency limit that bounds layer downloads across a fleet.
EGRESS_LIMIT = "tartflow-egress"
#: The steps run afresh, overwriting their cache record: for outputs that are not on disk.
_fetch_afresh = fetch_layer.with_options(refresh_cache=True)
_verify_afresh = verify_digest.with_options(refresh_cache=True)


def run_name() -> str:
    """``<runner>: <reference>`` for a run a runner's worker took from its queue, else
    ``pull <reference>`` (the ``tartflow`` command, a local run)."""
    ctx = FlowRunContext.get()
    reference = str((ctx.parameters or {}).get("reference", "")) if ctx else ""
    run = ctx.flow_run if ctx else None
    if run is not None and run.deployment_id is not None and run.work_queue_name:
        return f"{run.work_queue_name}: {reference}"
    return f"pull {reference}"


def sources(result: FetchResult, cached: bool) -> dict[str, int]:
    """Bytes of one blob by where they came from (zeros left out)."""
    if cached:
        return {"earlier run": result.size}
    if result.peer:  # a peer sent the layer decoded; its size on the wire is not the blob's
        return {"peer": result.size}
    found = {"registry": result.fetched - result.mirror, "mirror": result.mirror, "tart cache": result.reused,
             "on disk": result.resumed_from}
    rest = result.size - sum(found.values())  # verified into staging by another pull
    if rest > 0:
        found["other pull"] = rest
    return {k: v for k, v in found.items() if v > 0}


@flow(name="pull-image", flow_run_name=run_name, task_runner=ThreadPoolTaskRunner(max_workers=_POOL), log_prints=False)  # type: ignore[arg-type]
def pull_image(
    reference: str,
    insecure: bool = False,
    concurrency: Concurrency = 4,
    retry_for: RetryFor = 1800,
    egress_limit: str | None = EGRESS_LIMIT,
    mirrors: Mirrors = None,
    credentials_block: str | None = None,
    peers: list[str] | None = None,
) -> str:
    """Pull a Tart image into Tart's cache on this machine; returns the VM's directory.

    Args:
        reference: Tart image, e.g. ghcr.io/cirruslabs/macos-sequoia-base:latest
        insecure: Plain HTTP to the registry, as `tart pull --insecure`.
        concurrency: Layer downloads in flight on this runner (1-32).
        retry_for: Seconds to keep retrying temporary failures such as CDN egress limits.
        egress_limit: Prefect global concurrency limit held while a layer downloads
            (bounds downloads across the fleet); empty for none.
        mirrors: Pull-through mirrors per registry host, tried in order,
            e.g. {"ghcr.io": ["http://mirror.lan:5000"]}.
        credentials_block: Name of a Prefect Secret block holding registry credentials
            (never put credentials in a parameter).
        peers: Other runners' peer endpoints (`tartflow serve`) asked for layers before
            mirrors and the registry, e.g. ["http://runner-2.lan:8377"]; empty: $TARTFLOW_PEERS.
    """
    started = time.monotonic()
    digest: str | None = None
    try:
        with PullProgress():
            if credentials_block:
                use_secret_block(credentials_block, parse_reference(reference).host)
            settings = PullSettings.from_env(insecure=insecure, retry_for=retry_for, mirrors=mirrors,
                                             concurrency=concurrency, peers=peers)
            if settings.peers:
                use_peer_token_block()
            resolved = fetch_manifest(settings, reference)
            digest = resolved.manifest_digest
            reporter().started(resolved.reference, digest, resolved.compressed_size, resolved.disk_size,
                               resolved.layers_pending)
            results: list[tuple[FetchResult, bool]] = []
            if not resolved.installed:
                reporter().plan(resolved.compressed_size, resolved.layers_pending)
                results = _fetch_and_verify(settings, resolved, concurrency, egress_limit or None)
            path = assemble_vm(settings, resolved.reference, resolved.manifest_digest)
    except Exception as exc:
        events.pull_failed(reference, digest, exc)
        raise
    seconds = time.monotonic() - started
    _publish(resolved, results, seconds, Path(path))
    events.image_pulled(resolved.reference, resolved.manifest_digest, seconds=seconds,
                        fetched=sum(r.fetched for r, cached in results if not cached),
                        already_current=resolved.installed)
    return path


def _fetch_and_verify(
    settings: PullSettings, resolved: ResolvedImage, concurrency: int, egress_limit: str | None
) -> list[tuple[FetchResult, bool]]:
    """Fetch (and where needed verify) every blob; returns each fetch's result and whether it
    came from Prefect's cache."""
    reference, manifest_digest = resolved.reference, resolved.manifest_digest
    outputs = core.outputs(PullContext.build(settings), manifest_digest)
    pending = list(resolved.blobs)
    fetching: dict[concurrent.futures.Future[Any], tuple[str, PrefectConcurrentFuture[FetchResult]]] = {}
    verifying: list[PrefectFuture[int]] = []
    results: list[tuple[FetchResult, bool]] = []
    while pending or fetching:
        while pending and len(fetching) < concurrency:
            digest = pending.pop(0)
            fetch = fetch_layer if outputs.fetched(digest) else _fetch_afresh
            future = fetch.submit(settings, reference, manifest_digest, digest, egress_limit)
            assert isinstance(future, PrefectConcurrentFuture)  # the thread-pool runner's futures
            fetching[future.wrapped_future] = (digest, future)
        done, _ = concurrent.futures.wait(list(fetching), return_when=concurrent.futures.FIRST_COMPLETED)
        for wrapped in done:
            digest, future = fetching.pop(wrapped)
            fetched = future.result()  # raises the task's error: the flow fails with it
            cached = future.state.name == "Cached"  # final once result() returned: no API call
            if cached:  # the core did not run, so it reported nothing of this blob
                reporter().skip(fetched.size)
            results.append((fetched, cached))
            reporter().blob_done(digest, fetched.size, sources(fetched, cached))
            # A layer decoded on the way in was verified by its fetch, unless that was a cached
            # claim whose staging VM has gone since.
            if not (fetched.verified and outputs.verified(digest)):
                verify = verify_digest if outputs.verified(digest) else _verify_afresh
                verifying.append(verify.submit(settings, reference, manifest_digest, digest, fetched))
    for pending_verify in verifying:
        pending_verify.result()
    return results


def _publish(resolved: ResolvedImage, results: list[tuple[FetchResult, bool]], seconds: float, vm: Path) -> None:
    """A table artifact: per blob, bytes fetched (and of those, from a mirror), from peers,
    reused from Tart's cache, already on disk (a result from Prefect's cache moved nothing in
    this run); for a disk that started as a copy-on-write clone, what was cloned and the space
    the new disk adds."""
    rows = [
        {
            "blob": r.digest[:19],
            "size MB": round(r.size / 1e6, 2),
            "fetched MB": 0.0 if cached else round(r.fetched / 1e6, 2),
            "reused MB": 0.0 if cached else round(r.reused / 1e6, 2),
            "mirror MB": 0.0 if cached else round(r.mirror / 1e6, 2),
            "peer MB": 0.0 if cached else round(r.peer / 1e6, 2),
            "already on disk MB": round((r.size if cached else r.resumed_from) / 1e6, 2),
            "seconds": 0.0 if cached else round(r.seconds, 2),
            "MB/s": round(r.fetched / 1e6 / r.seconds, 1) if r.seconds > 0 and not cached else None,
            "cached": cached,
        }
        for r, cached in results
    ]
    fetched = sum(r.fetched for r, cached in results if not cached)
    peer = sum(r.peer for r, cached in results if not cached)
    reused = sum(r.reused for r, cached in results if not cached)
    mirror = sum(r.mirror for r, cached in results if not cached)
    summary = (
        f"**{resolved.reference}** ({resolved.manifest_digest[:19]}): "
        + ("already current in Tart's cache, nothing fetched" if resolved.installed else
           f"{fetched / 1e6:.1f} MB fetched of {resolved.compressed_size / 1e6:.1f} MB "
           f"in {seconds:.1f} s ({fetched / 1e6 / max(seconds, 1e-9):.1f} MB/s); "
           f"{mirror / 1e6:.1f} MB of it from mirrors; {peer / 1e6:.1f} MB from peers, "
           f"{reused / 1e6:.1f} MB reused from Tart's cache")
    )
    if resolved.cloned:
        cow = cowbase.refresh_report(resolved.cloned, resolved.cloned_blobs, (r for r, _ in results), vm / "disk.img")
        new = "unknown" if cow.net_new is None else f"{cow.net_new / 1e6:.1f} MB"
        summary += (f"; {cow.cloned / 1e6:.1f} MB cloned copy-on-write from {resolved.clone_base}, "
                    f"{cow.copied / 1e6:.1f} MB copied, net new space {new}")
    create_table_artifact(table=rows, key="tartflow-pull", description=summary)
