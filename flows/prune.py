"""The ``prune-cache`` flow: drop images from this runner's Tart cache, as ``tartflow prune``.

Run by ``prewarm-fleet`` (parameter ``prune_older_than``) on each runner's queue after its
pulls: images not in ``keep`` and not accessed within ``older_than`` seconds go. What went is
published as a table artifact (key ``tartflow-prune``), which the prewarm run gathers.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.params import RetryFor
from tartflow.prune import prune_cache as prune_core
from tartflow.reference import parse_reference
from tartflow.tartcache import TartCache

__all__ = ["PRUNE_ARTIFACT", "prune_cache"]

PRUNE_ARTIFACT = "tartflow-prune"


@flow(name="prune-cache", log_prints=False)
def prune_cache(older_than: RetryFor, keep: list[str] | None = None, dry_run: bool = False) -> list[dict[str, object]]:
    """Remove cached images last accessed more than ``older_than`` seconds ago; returns what went.

    Args:
        older_than: Seconds since an image was last accessed before it may go (86400 = one day).
        keep: Image references never removed, e.g. the images a prewarm run just pulled.
        dry_run: Only report what would go.
    """
    logger = get_run_logger()
    keep_names = frozenset(str(parse_reference(ref)) for ref in keep or [])
    report = prune_core(TartCache(), older_than=older_than, keep=keep_names, dry_run=dry_run)
    rows: list[dict[str, object]] = [
        {"image": entry.label, "size GB": round(entry.size / 1e9, 3), "digest": entry.path.name[:19]}
        for entry in report.removed
    ]
    for entry in report.removed:
        logger.info("%s %s (%.2f GB)", "would remove" if dry_run else "removed", entry.label, entry.size / 1e9)
    for entry in report.busy:
        logger.warning("kept %s: a tart pull holds the lock on %s", entry.label, entry.host)
    create_table_artifact(table=rows or [{"image": "(nothing)", "size GB": 0, "digest": ""}], key=PRUNE_ARTIFACT,
                          description=f"pruned {len(rows)} image(s), {report.freed / 1e9:.2f} GB")
    return rows
