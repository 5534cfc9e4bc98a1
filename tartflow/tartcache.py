"""Tart's OCI cache on disk, exactly as Tart lays it out (Config.swift, VMStorageOCI.swift).

``$TART_HOME/cache/OCIs/<host with : as %3A>/<namespace dirs>/sha256:<hex>`` holds a VM
(``config.json``, ``disk.img``, ``nvram.bin``, ``manifest.json``); a tag is a symbolic link with
an absolute target beside it. Installing takes the ``flock`` Tart holds on the host directory,
so a ``tart pull`` running beside tartflow cannot interleave with the rename and the link.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import hostlock
from .collect import collect_host
from .errors import StoreError
from .reference import Reference, validate_digest
from .store import fsync_dir

__all__ = ["CachedImage", "TartCache", "tart_home"]

VM_FILES = ("config.json", "disk.img", "nvram.bin")
EXPLICITLY_PULLED = ".explicitly-pulled"


def tart_home() -> Path:
    """``$TART_HOME``, else ``~/.tart``, made absolute the way Tart's URLs are (no symlink resolution)."""
    raw = os.environ.get("TART_HOME") or os.path.join(os.path.expanduser("~"), ".tart")
    return Path(os.path.normpath(os.path.abspath(raw)))


@dataclass(frozen=True)
class CachedImage:
    name: str  # host/ns:tag or host/ns@sha256:...
    digest: str
    path: Path
    disk_size: int  # apparent size of disk.img
    size_on_disk: int  # allocated bytes of all files
    accessed: float


class TartCache:
    def __init__(self, home: Path | None = None) -> None:
        self.home = home or tart_home()
        self.oci_root = self.home / "cache" / "OCIs"

    def host_dir(self, host: str) -> Path:
        return self.oci_root / host.replace(":", "%3A")

    def repo_dir(self, ref: Reference) -> Path:
        return self.host_dir(ref.host).joinpath(*ref.repository.split("/"))

    def digest_dir(self, ref: Reference, digest: str) -> Path:
        return self.repo_dir(ref) / validate_digest(digest)

    @staticmethod
    def is_vm(path: Path) -> bool:
        return all((path / name).is_file() for name in VM_FILES)

    def current(self, ref: Reference, digest: str) -> bool:
        """True when ``ref`` already names ``digest`` in the cache as a complete VM."""
        target = self.digest_dir(ref, digest)
        if not self.is_vm(target):
            return False
        if ref.tag is None:
            return True
        link = self.repo_dir(ref) / ref.tag
        return link.is_symlink() and os.readlink(link) == str(target)

    @contextmanager
    def host_lock(self, host: str) -> Iterator[None]:
        """Tart's own lock: ``flock`` on the host directory itself.

        A ``tart pull`` holds it for its whole download, so waiting is said out loud at once
        (hostlock.py) and stays interruptible: a stop request (Ctrl+C, SIGTERM) ends the wait.
        """
        with hostlock.held(self.host_dir(host)):
            yield

    def try_host_lock(self, host: str) -> AbstractContextManager[bool]:
        """The host lock if it is free now (yields True), else yields False without waiting."""
        return hostlock.held_if_free(self.host_dir(host))

    def install(self, ref: Reference, digest: str, staging: Path | None = None) -> Path:
        """Move a complete VM from ``staging`` into place (if given) and point the tag at it.

        Rename only: nothing half-written ever sits at a final path. If the digest directory
        already holds a VM, it is kept and ``staging`` removed ("already exists" is success).
        A pull by digest leaves ``.explicitly-pulled`` so Tart's GC keeps the untagged VM.
        """
        target = self.digest_dir(ref, digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if staging is not None and os.stat(staging).st_dev != os.stat(target.parent).st_dev:
            raise StoreError(
                f"tartflow's store ({staging.parent}) and Tart's cache ({self.oci_root}) are on different "
                "file systems; set TARTFLOW_HOME to a directory on the same one as TART_HOME"
            )
        with self.host_lock(ref.host):
            if staging is not None and self.is_vm(target):
                shutil.rmtree(staging, ignore_errors=True)
            elif staging is not None:
                if target.exists():  # a broken leftover (not a VM): Tart would discard it too
                    shutil.rmtree(target)
                os.rename(staging, target)
                fsync_dir(target.parent)
            if not self.is_vm(target):
                raise StoreError(f"{target} is not a complete VM; run the pull again")
            if ref.tag is not None:
                self._link_tag(ref, target)
                collect_host(self, ref.host)  # as Tart: link() then gc(), under the same lock
            else:
                (target / EXPLICITLY_PULLED).touch()
        self.mark_accessed(target)
        return target

    def _link_tag(self, ref: Reference, target: Path) -> None:
        link = self.repo_dir(ref) / str(ref.tag)
        previous = os.readlink(link) if link.is_symlink() else None
        if previous == str(target):
            return
        tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(str(target), tmp)
        os.replace(tmp, link)
        fsync_dir(link.parent)
        if previous and Path(previous).is_dir():
            # As Tart does: the image the tag left goes first when Tart prunes by access time.
            os.utime(previous, (0, os.stat(previous).st_mtime))

    @staticmethod
    def mark_accessed(path: Path) -> None:
        os.utime(path, (time.time(), os.stat(path).st_mtime))

    def list(self) -> list[CachedImage]:
        """Every tag and digest entry, like ``tart list --source oci``."""
        images: list[CachedImage] = []
        if not self.oci_root.is_dir():
            return images
        for host_dir in sorted(p for p in self.oci_root.iterdir() if p.is_dir()):
            host = host_dir.name.replace("%3A", ":")
            for dirpath, dirnames, filenames in os.walk(host_dir):
                here = Path(dirpath)
                repo = "/".join(here.relative_to(host_dir).parts)
                for name in sorted(dirnames + filenames):
                    entry = here / name
                    if name.startswith("sha256:") and not entry.is_symlink() and self.is_vm(entry):
                        images.append(_describe(f"{host}/{repo}@{name}", name, entry))
                    elif entry.is_symlink() and self.is_vm(entry):
                        target = Path(os.readlink(entry))
                        images.append(_describe(f"{host}/{repo}:{name}", target.name, target))
                dirnames[:] = [d for d in dirnames if not d.startswith("sha256:")]
        return images


def _describe(name: str, digest: str, path: Path) -> CachedImage:
    disk = path / "disk.img"
    on_disk = sum(_allocated(path / f) for f in (*VM_FILES, "manifest.json"))
    return CachedImage(name, digest, path, disk.stat().st_size, on_disk, os.stat(path).st_atime)


def _allocated(path: Path) -> int:
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    return getattr(st, "st_blocks", 0) * 512 or st.st_size
