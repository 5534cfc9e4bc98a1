"""The pull's steps as Prefect tasks: each takes small serialisable values and calls one core
function in ``tartflow.pull``.

Caching keys on content: a fetch-layer result is reused only while the committed blob it
produced is still on disk, the same file (inode, size, mtime); a verify-digest result only
while the staging VM still holds that layer verified. When the file has gone, the key is None
(no cache), so a stale record can never count as done. Retries: the core already retries
temporary failures for ``retry_for``; Prefect retries what is still temporary and was not
retried to exhaustion, never a permanent error (404, 401 after login, a corrupt image).
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext

from tartflow import pull as core
from tartflow.errors import TartflowError

__all__ = ["assemble_vm", "fetch_layer", "fetch_manifest", "is_temporary", "verify_digest"]


def is_temporary(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn: retry only errors that say they are temporary and not exhausted."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, TartflowError) and exc.temporary and not exc.exhausted


def _settings(settings: dict[str, Any]) -> core.PullSettings:
    return core.PullSettings(**settings)


def _file_key(kind: str, *paths: Path) -> str | None:
    parts = [kind]
    for path in paths:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        parts.append(f"{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return "tartflow-" + hashlib.sha256("|".join(parts).encode()).hexdigest()


def _fetch_key(ctx: TaskRunContext, params: dict[str, Any]) -> str | None:
    """Keyed on the committed blob's file, or, for a layer taken from Tart's cache, on the
    staging files that prove it verified; None (no cache) when neither exists."""
    settings = _settings(params["settings"])
    blob = settings.open_store().blob_path(params["digest"])
    if blob.exists():
        return _file_key("fetch-layer", blob)
    evidence = core.staged_evidence(settings, params["manifest_digest"], params["digest"])
    return _file_key("fetch-layer-local", *evidence) if evidence else None


def _verify_key(ctx: TaskRunContext, params: dict[str, Any]) -> str | None:
    settings = _settings(params["settings"])
    evidence = core.staged_evidence(settings, params["manifest_digest"], params["digest"])
    return _file_key("verify-digest", *evidence) if evidence else None


_RETRY_DELAYS: list[float] = [5, 30]


@task(name="fetch-manifest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=_RETRY_DELAYS, retry_condition_fn=is_temporary)  # tags move: always ask
def fetch_manifest(settings: dict[str, Any], reference: str) -> dict[str, Any]:
    return core.resolve(_settings(settings), reference).to_dict()


@task(name="fetch-layer", cache_key_fn=_fetch_key, persist_result=True, retries=2, retry_delay_seconds=_RETRY_DELAYS, retry_condition_fn=is_temporary)
def fetch_layer(
    settings: dict[str, Any], reference: str, manifest_digest: str, digest: str, egress_limit: str | None = None
) -> dict[str, Any]:
    """Fetch one blob; while it moves bytes over the network it holds a slot of the global
    concurrency limit ``egress_limit`` (if that limit exists), so a fleet bounds its egress."""

    def gate() -> AbstractContextManager[object]:
        return concurrency(egress_limit, occupy=1, strict=False) if egress_limit else nullcontext()

    result = core.fetch(_settings(settings), reference, manifest_digest, digest, gate=gate)
    return dict(result.__dict__)


@task(name="verify-digest", cache_key_fn=_verify_key, persist_result=True, retries=2, retry_delay_seconds=_RETRY_DELAYS, retry_condition_fn=is_temporary)
def verify_digest(
    settings: dict[str, Any], reference: str, manifest_digest: str, digest: str, fetched: dict[str, Any]
) -> int:
    """Second verification: every disk layer of the blob decoded into the staging VM and
    checked against its content digest (done on the way in for most), config/NVRAM placed."""
    return core.verify(_settings(settings), reference, manifest_digest, digest)


@task(name="assemble-vm", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=_RETRY_DELAYS, retry_condition_fn=is_temporary)
def assemble_vm(settings: dict[str, Any], reference: str, manifest_digest: str) -> str:
    return core.assemble(_settings(settings), reference, manifest_digest)

