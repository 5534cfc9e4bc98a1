"""Tart's garbage collection of its OCI cache, run right after a tag is linked (as Tart does).

Within one host directory ``OCIs/<host>``, whose lock the caller holds:

- a tag link whose target is gone is removed (the link itself, never what it points to);
- a digest directory that is a complete VM, that no tag links to and that holds no
  ``.explicitly-pulled`` (written by a pull by digest) is removed.

Only that host is collected: Tart walks every host under one host's lock, which lets it
delete an image another host's pull has just moved into place but not yet linked. Other hosts
are collected when a tag of theirs is linked. Entries that are not complete VMs (a stacked
image has no ``disk.img``; a leftover Tart or tartflow does not know) are stepped over, as
Tart 2.35 does. Deletion never follows a symbolic link and never leaves ``OCIs/<host>``.

A pull copying layers out of a VM being removed keeps reading the file it opened (POSIX keeps
an unlinked file alive while open); one that had not opened it yet falls back to the next copy
or the network (reuse.py), so collection never fails a pull.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tartcache import TartCache

__all__ = ["Collected", "collect_host", "remove_digest_dir", "tag_links"]

log = logging.getLogger("tartflow.collect")

EXPLICITLY_PULLED = ".explicitly-pulled"
_VM_FILES = ("config.json", "disk.img", "nvram.bin")


@dataclass
class Collected:
    removed: list[Path] = field(default_factory=list)
    broken_links: list[Path] = field(default_factory=list)


def tag_links(host_dir: Path) -> dict[Path, list[Path]]:
    """Every symbolic link under ``host_dir`` -> its target as an absolute path (unresolved);
    none when ``host_dir`` itself is a link (it is not walked: os.walk follows its top)."""
    links: dict[Path, list[Path]] = {}
    if host_dir.is_symlink():
        return links
    for dirpath, dirnames, filenames in os.walk(host_dir):
        here = Path(dirpath)
        for name in (*dirnames, *filenames):
            entry = here / name
            if entry.is_symlink():
                target = Path(os.path.normpath(here / os.readlink(entry)))
                links.setdefault(target, []).append(entry)
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink() and not d.startswith("sha256:")]
    return links


def digest_dirs(host_dir: Path) -> list[Path]:
    """Real directories named ``sha256:*`` under ``host_dir`` (never through a symlink, so
    none when ``host_dir`` itself is one)."""
    found: list[Path] = []
    if host_dir.is_symlink():
        return found
    for dirpath, dirnames, _ in os.walk(host_dir):
        here = Path(dirpath)
        for name in dirnames:
            if name.startswith("sha256:") and not (here / name).is_symlink():
                found.append(here / name)
        dirnames[:] = [d for d in dirnames if not d.startswith("sha256:") and not (here / d).is_symlink()]
    return sorted(found)


def collect_host(cache: TartCache, host: str) -> Collected:
    """Collect ``OCIs/<host>`` as Tart's ``gc()`` would; the caller holds the host lock."""
    host_dir = cache.host_dir(host)
    done = Collected()
    if not host_dir.is_dir() or host_dir.is_symlink():
        return done
    links = tag_links(host_dir)
    # Compared resolved: a link Tart wrote through another spelling of TART_HOME still counts.
    linked = {os.path.realpath(target) for target in links}
    for target, entries in links.items():
        if not target.exists():
            for link in entries:
                if link.is_symlink():
                    link.unlink()
                    done.broken_links.append(link)
    for vm in digest_dirs(host_dir):
        if os.path.realpath(vm) in linked or not _is_vm(vm) or (vm / EXPLICITLY_PULLED).exists():
            continue
        if remove_digest_dir(cache, vm):
            done.removed.append(vm)
            log.info("removed %s: no tag points at it any more (as tart would)", vm)
    return done


def _is_vm(path: Path) -> bool:
    return all((path / name).is_file() for name in _VM_FILES)


def remove_digest_dir(cache: TartCache, path: Path) -> bool:
    """Delete one digest directory of Tart's cache; refuses anything that is not a real
    directory named ``sha256:*`` strictly inside ``OCIs/`` of this ``TART_HOME``, reached
    without passing through a symbolic link."""
    root = os.path.realpath(cache.oci_root)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    parent = os.path.realpath(path.parent)
    inside = parent == root or parent.startswith(root + os.sep)
    plain = cache.plain(path)
    if not stat.S_ISDIR(st.st_mode) or not path.name.startswith("sha256:") or not inside or parent == root or not plain:
        log.warning("refusing to delete %s: not a digest directory inside %s", path, cache.oci_root)
        return False
    # rename first, so nobody sees half a VM at its final path, then delete at leisure
    doomed = path.with_name(f".{path.name}.{os.getpid()}.removing")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)  # rmtree never follows symlinks inside
    return True
