"""Retention of Tart's OCI cache: ``tartflow prune`` and the room a pull makes before it starts.

Entries are digest directories holding a complete VM (a stacked image has no ``disk.img`` and
is stepped over, as Tart 2.35 does), ranked by the directory's access time, sized by what
they allocate. ``prune_cache`` has ``tart prune --entries caches`` semantics: first every entry
last accessed ``older_than`` seconds ago or earlier goes, then, newest first, entries are kept
while their running total fits ``space_budget`` and every entry after the first that does not
fit goes. A pruned entry's tag links go with it (``tart list`` shows no broken names).

Each host is touched only under Tart's lock on ``OCIs/<host>``, taken without waiting: while a
``tart pull`` holds it, that host's entries are left alone and reported as kept.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint
from .collect import digest_dirs, remove_digest_dir, tag_links
from .errors import InsufficientSpaceError, TartflowError
from .gc import collect as collect_store
from .manifest import TartImage, parse_manifest
from .progress import LogReporter, reporter
from .reference import Reference
from .staging import Staging
from .store import Store
from .tartcache import TartCache

__all__ = ["ABANDONED_AFTER", "NO_AUTO_PRUNE", "Entry", "PruneReport", "cache_entries", "make_room", "parse_duration", "parse_size", "prune_cache", "pull_peak", "remove_entry"]

log = logging.getLogger("tartflow.prune")

_ENTRY_FILES = ("config.json", "disk.img", "nvram.bin", "manifest.json", ".explicitly-pulled")


@dataclass(frozen=True)
class Entry:
    path: Path  # the digest directory
    host: str
    names: tuple[str, ...]  # host/ns:tag for each tag on it, else host/ns@sha256:...
    size: int  # bytes allocated
    accessed: float
    repository: str = ""  # host/ns, as references name it

    @property
    def label(self) -> str:
        return ", ".join(self.names)

    def layer_digests(self) -> set[str]:
        try:
            image = parse_manifest((self.path / "manifest.json").read_bytes(), self.path.name)
        except (TartflowError, OSError):  # an unreadable manifest shares nothing we can prove
            return set()
        return {layer.blob.digest for layer in image.disk_layers}


@dataclass
class PruneReport:
    removed: list[Entry] = field(default_factory=list)
    busy: list[Entry] = field(default_factory=list)  # kept: a tart pull holds the host's lock
    dry_run: bool = False

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.removed)


def cache_entries(cache: TartCache) -> list[Entry]:
    """Every complete VM in Tart's OCI cache, oldest access first."""
    entries: list[Entry] = []
    if not cache.oci_root.is_dir():
        return entries
    for host_dir in sorted(p for p in cache.oci_root.iterdir() if p.is_dir() and not p.is_symlink()):
        host = host_dir.name.replace("%3A", ":")
        links = {os.path.realpath(t): ls for t, ls in tag_links(host_dir).items()}
        for vm in digest_dirs(host_dir):
            if not TartCache.is_vm(vm):
                continue
            repo = "/".join(vm.parent.relative_to(host_dir).parts)
            tags = sorted(link.name for link in links.get(os.path.realpath(vm), []))
            names = tuple(f"{host}/{repo}:{t}" for t in tags) or (f"{host}/{repo}@{vm.name}",)
            accessed = os.stat(vm).st_atime
            entries.append(Entry(vm, host, names, _allocated(vm), accessed, f"{host}/{repo}"))
    return sorted(entries, key=lambda e: e.accessed)


def _allocated(path: Path) -> int:
    """Bytes allocated by the files a cached VM is made of. Looked up by name, never listed:
    reading a directory moves its access time, which is what entries are ranked by."""
    total = 0
    for name in _ENTRY_FILES:
        try:
            st = os.lstat(path / name)
        except OSError:
            continue
        total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def remove_entry(cache: TartCache, entry: Entry) -> bool:
    """Delete ``entry`` and its tag links under the host lock; False if the lock is busy."""
    with cache.try_host_lock(entry.host) as got:
        if not got:
            return False
        host_dir = cache.host_dir(entry.host)
        for target, links in tag_links(host_dir).items():
            if os.path.realpath(target) == os.path.realpath(entry.path):
                for link in links:
                    link.unlink(missing_ok=True)
        remove_digest_dir(cache, entry.path)
    return True


def prune_cache(
    cache: TartCache, *, older_than: float | None = None, space_budget: int | None = None,
    dry_run: bool = False, keep: frozenset[str] = frozenset(), now: float | None = None,
) -> PruneReport:
    """Prune like ``tart prune --entries caches``; entries named in ``keep`` (a reference as
    ``host/ns:tag`` or ``host/ns@sha256:...``) are never removed."""
    now = time.time() if now is None else now
    report = PruneReport(dry_run=dry_run)
    entries = [e for e in cache_entries(cache) if not _kept(e, keep)]
    doomed: list[Entry] = []
    if older_than is not None:
        doomed = [e for e in entries if e.accessed <= now - older_than]
    if space_budget is not None:
        used = 0
        for entry in sorted((e for e in entries if e not in doomed), key=lambda e: e.accessed, reverse=True):
            used += entry.size
            if used > space_budget:
                doomed.append(entry)
    for entry in doomed:
        if dry_run or remove_entry(cache, entry):
            report.removed.append(entry)
        else:
            report.busy.append(entry)
    return report


def _kept(entry: Entry, keep: frozenset[str]) -> bool:
    return any(name in keep for name in entry.names) or f"{entry.repository}@{entry.path.name}" in keep


def announce(text: str) -> None:
    """To the terminal (the progress reporter) and to the ``tartflow`` logger (a flow run's
    logs), once: a LogReporter without its own output already writes to that logger."""
    current = reporter()
    current.note(text)
    if not (isinstance(current, LogReporter) and getattr(current, "_emit", None) is None):
        log.info("%s", text)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZES = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_duration(text: str) -> float:
    """Seconds from ``90``/``90s``, ``30m``, ``2h``, ``7d`` or ``2w``; ValueError otherwise."""
    text = text.strip()
    number, unit = (text[:-1], text[-1].lower()) if text and text[-1].lower() in _UNITS else (text, "s")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"expected a duration like 90s, 30m, 2h or 7d, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"a duration must be zero or more, got {text!r}")
    return value


def parse_size(text: str) -> int:
    """Bytes from ``500``, ``50GB``, ``20G``, ``1.5TB`` or ``100GiB`` (decimal units, as Tart's GB)."""
    raw = text.strip().upper().replace(" ", "")
    digits = raw.rstrip("KMGTIB")
    unit = raw[len(digits):]
    try:
        value = float(digits) * _SIZES[unit]
    except (ValueError, KeyError):
        raise ValueError(f"expected a size like 50GB, 20G or 100GiB, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"a size must be zero or more, got {text!r}")
    return int(value)


# --- room before a pull ---------------------------------------------------------------------

#: Tart's switch: when set (to anything), nothing is evicted to make room.
NO_AUTO_PRUNE = "TART_NO_AUTO_PRUNE"
#: A partial download or staging VM in tartflow's store that nobody holds locked and nobody
#: wrote for this long counts as abandoned, and goes before any cached image.
ABANDONED_AFTER = 3600.0


def pull_peak(store: Store, staging: Staging, image: TartImage, pending: list[str], concurrency: int) -> int:
    """The most bytes this pull can add to the disk at any moment, from fetch.py/pull.py:

    peak = D + K + S, where
      D = decoded bytes of every disk layer not yet done in the staging VM (``disk.img`` is
          sparse and filled layer by layer; finished layers already hold their blocks);
      K = compressed bytes still missing of every pending blob that is kept in the store until
          ``verify`` places or decodes it: config, NVRAM, and blobs several disk layers share;
      S = for disk layers decoded on the way in (a blob used by exactly one layer): nothing when
          checkpoints work here (no compressed byte is written), plus what a partial already on
          disk will still append; else their compressed bytes go through the store, and at most
          ``concurrency`` of them are in flight, so the ``concurrency`` largest still missing.
    Installing is a rename, so it adds nothing; the image a moving tag leaves is removed only
    after linking, so it still counts as used space (evicting it first is what frees that).
    """
    uses: dict[str, int] = {}
    for layer in image.disk_layers:
        uses[layer.blob.digest] = uses.get(layer.blob.digest, 0) + 1
    sizes = {d.digest: d.size for d in image.blobs}
    decoded = sum(layer.uncompressed_size for i, layer in enumerate(image.disk_layers) if not staging.layer_done(i))
    kept = streamed = 0
    in_flight: list[int] = []
    for digest in pending:
        if store.has_blob(digest, sizes[digest]):
            continue
        partial = _partial_size(store, digest)
        missing = max(0, sizes[digest] - partial)
        if uses.get(digest, 0) != 1:
            kept += missing
        elif partial or not checkpoint.possible():
            in_flight.append(missing)
    streamed = sum(sorted(in_flight, reverse=True)[: max(1, concurrency)])
    return decoded + kept + streamed


def _partial_size(store: Store, digest: str) -> int:
    try:
        return os.stat(store.ingest_dir(digest) / "data").st_size
    except OSError:
        return 0


def make_room(
    cache: TartCache, store: Store, staging: Staging, ref: Reference, needed: int, margin: float,
) -> None:
    """Free disk space until ``needed + margin`` bytes fit, as Tart's ``reclaimIfNeeded``:
    abandoned partials in tartflow's store first, then cached images least recently accessed
    first; the image the tag is about to leave goes first, or last when this pull reuses its
    layers. Each eviction is announced. With ``TART_NO_AUTO_PRUNE`` set nothing is evicted and
    the pull fails at once; when everything evictable is gone and it still does not fit, too.
    """
    want = needed + max(0.0, margin)
    free = _free(store)
    if want <= free:
        return
    if NO_AUTO_PRUNE in os.environ:
        raise InsufficientSpaceError(
            f"not enough disk space for {ref}: it needs {int(want)} bytes ({want / 1e9:.2f} GB, margin included), "
            f"{free} bytes are free, and {NO_AUTO_PRUNE} is set so nothing was evicted; free space "
            f"(tartflow prune, tart prune) or unset {NO_AUTO_PRUNE}"
        )
    freed = collect_store(store, ABANDONED_AFTER, keep=staging.image.manifest_digest)
    if freed.removed:
        announce(f"making room for {ref}: removed {len(freed.removed)} abandoned partial(s) from tartflow's store "
                 f"({freed.freed / 1e9:.2f} GB)")
    for entry in _eviction_order(cache, staging.image, ref):
        free = _free(store)
        if want <= free:
            return
        if remove_entry(cache, entry):
            announce(f"making room for {ref}: evicted {entry.label} ({entry.size / 1e9:.2f} GB)")
    free = _free(store)
    if want > free:
        raise InsufficientSpaceError(
            f"not enough disk space for {ref} even after evicting every cached image it could: it needs "
            f"{int(want)} bytes ({want / 1e9:.2f} GB, margin included), {free} bytes are free at {store.root}; "
            "free some space and run the same command again"
        )


def _free(store: Store) -> int:
    st = os.statvfs(store.root)
    return st.f_bavail * st.f_frsize


def _eviction_order(cache: TartCache, image: TartImage, ref: Reference) -> list[Entry]:
    """Least recently accessed first; the image the tag leaves first, or last if reused."""
    target = os.path.realpath(cache.digest_dir(ref, image.manifest_digest))
    entries = [e for e in cache_entries(cache) if os.path.realpath(e.path) != target]
    leaving = _tag_target(cache, ref)
    left = [e for e in entries if leaving is not None and os.path.realpath(e.path) == leaving]
    rest = [e for e in entries if e not in left]
    if left and left[0].layer_digests() & {layer.blob.digest for layer in image.disk_layers}:
        return rest + left
    return left + rest


def _tag_target(cache: TartCache, ref: Reference) -> str | None:
    if ref.tag is None:
        return None
    link = cache.repo_dir(ref) / ref.tag
    return os.path.realpath(link) if link.is_symlink() else None
