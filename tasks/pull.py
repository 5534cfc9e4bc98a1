"""The pull's steps as Prefect tasks: each takes and returns typed values (``PullSettings``,
``ResolvedImage``, ``FetchResult``) as themselves, builds a ``PullContext`` once per run and
calls one core function in ``tartflow.pull``.

Caching: fetch-layer and verify-digest are keyed on their inputs by content, computed before
they run: the manifest digest, the blob digest and where the output lands (``Landing``: this
machine, Tart home, store), under ``CACHE_PREFIX`` (results of an older shape never count).
A key says nothing about whether the output is still there; the flow asks that (``Outputs``)
and submits with ``refresh_cache=True`` when it has gone, so a stale record never counts as
done. Results are persisted by Prefect's result store: the local ``$PREFECT_HOME/storage`` of
the process running the flow unless the server or settings name default result storage, and
looked up there by key, so a record written by one run (killed or not) is found by the next
run on that machine, on an ephemeral server or a real one.

Retries: the core already retries temporary failures for ``retry_for``; Prefect retries what
is still temporary and was not retried to exhaustion, never a permanent error (404, 401 after
login, a corrupt image).
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from tartflow import pull as core
from tartflow.errors import TartflowError
from tartflow.fetch import FetchResult
from tartflow.pull import PullContext, PullSettings, ResolvedImage
from tasks.egress import guarded, slot

__all__ = ["CACHE_PREFIX", "assemble_vm", "fetch_layer", "fetch_manifest", "is_temporary", "verify_digest"]

#: Changes whenever what a cached result holds changes shape (v1 held dicts).
CACHE_PREFIX = "tartflow-v2"


def is_temporary(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn: retry only errors that say they are temporary and not exhausted."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, TartflowError) and exc.temporary and not exc.exhausted


def content_key(step: str, settings: PullSettings, manifest_digest: str, digest: str) -> str:
    """The cache key of ``step`` for one blob of one image landing where ``settings`` say;
    touches no file (the environment names Tart home and the store)."""
    landing = settings.landing()
    parts = (step, manifest_digest, digest, landing.host, landing.tart_home, landing.store)
    return f"{CACHE_PREFIX}-{step}-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _fetch_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    return content_key("fetch-layer", params["settings"], params["manifest_digest"], params["digest"])


def _verify_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    return content_key("verify-digest", params["settings"], params["manifest_digest"], params["digest"])


_RETRY_DELAYS: list[float] = [5, 30]


@task(name="fetch-manifest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=_RETRY_DELAYS, retry_condition_fn=is_temporary)  # tags move: always ask
def fetch_manifest(settings: PullSettings, reference: str) -> ResolvedImage:
    return core.resolve(PullContext.build(settings), reference)


@task(name="fetch-layer", task_run_name="fetch-layer-{digest}", cache_key_fn=_fetch_key, persist_result=True,
      retries=2, retry_delay_seconds=_RETRY_DELAYS, retry_condition_fn=is_temporary)
def fetch_layer(
    settings: PullSettings, reference: str, manifest_digest: str, digest: str, egress_limit: str | None = None
) -> FetchResult:
    """Fetch one blob; while it moves bytes over the network it holds a slot of the global
    concurrency limit ``egress_limit`` (if that limit exists), so a fleet bounds its egress
    (``tasks.egress.slot``: two requests per layer, where Prefect's ``concurrency()`` makes four)."""

    def gate() -> AbstractContextManager[object]:
        if not egress_limit:
            return nullcontext()
        return guarded(egress_limit, lambda: slot(egress_limit))

    return core.fetch(PullContext.build(settings), reference, manifest_digest, digest, gate=gate)


@task(name="verify-digest", task_run_name="verify-digest-{digest}", cache_key_fn=_verify_key, persist_result=True,
      retries=2, retry_delay_seconds=_RETRY_DELAYS, retry_condition_fn=is_temporary)
def verify_digest(
    settings: PullSettings, reference: str, manifest_digest: str, digest: str, fetched: FetchResult
) -> int:
    """Second verification: every disk layer of the blob decoded into the staging VM and
    checked against its content digest (done on the way in for most), config/NVRAM placed."""
    return core.verify(PullContext.build(settings), reference, manifest_digest, digest)


@task(name="assemble-vm", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=_RETRY_DELAYS, retry_condition_fn=is_temporary)
def assemble_vm(settings: PullSettings, reference: str, manifest_digest: str) -> str:
    return core.assemble(PullContext.build(settings), reference, manifest_digest)
