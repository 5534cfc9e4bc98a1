"""Tart's OCI cache on disk, exactly as Tart lays it out (Config.swift, VMStorageOCI.swift).

``$TART_HOME/cache/OCIs/<host with : as %3A>/<namespace dirs>/sha256:<hex>`` holds a VM
(``config.json``, ``disk.img``, ``nvram.bin``, ``manifest.json``); a tag is a symbolic link with
an absolute target beside it. Installing takes the ``flock`` Tart holds on the host directory,
so a ``tart pull`` running beside tartflow cannot interleave with the rename and the link.

Nothing is written or deleted through a symbolic link below ``OCIs/``: the host, namespace
and digest directories must be real directories (created one at a time, each checked), and
the only link tartflow writes is a tag, replaced atomically (a link under a temporary name,
then a rename). A link found where a directory must be is a ``CacheLayoutError`` naming it;
so is the one layout collision Tart's scheme allows (``acme/vm:x`` is the link
``acme/vm/x``, which ``acme/vm/x:latest`` would need as a directory). ``OCIs/`` itself and
everything above it (``TART_HOME`` on another volume, say) are the user's to link as they like.
A VM counts as installed only when intact (intact.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import hostlock, intact
from .collect import collect_host
from .errors import CacheLayoutError, StoreError
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
        """Tart's own test: the three VM files exist (nothing is verified)."""
        return all((path / name).is_file() for name in VM_FILES)

    # --- layout: never through a link ------------------------------------------------------

    def plain(self, path: Path) -> bool:
        """``path`` is strictly inside ``OCIs/`` and it and every directory between are real
        directories (no symbolic link, nothing else); False if anything is missing."""
        try:
            self._walk(path, create=False, missing_ok=False)
        except (CacheLayoutError, FileNotFoundError):
            return False
        return True

    def _walk(self, path: Path, *, create: bool, missing_ok: bool = True) -> None:
        """Check (or, with ``create``, make one at a time) each directory from ``OCIs/`` down to
        ``path``; raise CacheLayoutError at the first that is a link or not a directory."""
        try:
            parts = path.relative_to(self.oci_root).parts
        except ValueError:
            raise CacheLayoutError(f"{path} is outside Tart's cache {self.oci_root}; tartflow touches nothing there") from None
        if not parts or ".." in parts:
            raise CacheLayoutError(f"{path} is not an entry of Tart's cache {self.oci_root}")
        if create:
            self.oci_root.mkdir(parents=True, exist_ok=True)
        here = self.oci_root
        for part in parts:
            here = here / part
            try:
                st = os.lstat(here)
            except FileNotFoundError:
                if not create:
                    if missing_ok:
                        return
                    raise
                with contextlib.suppress(FileExistsError):  # made meanwhile: checked next, whatever it is
                    os.mkdir(here)
                st = os.lstat(here)
            if not stat.S_ISDIR(st.st_mode):  # lstat: a symbolic link is never a directory here
                raise self._layout_error(here, st)

    def _layout_error(self, path: Path, st: os.stat_result) -> CacheLayoutError:
        if not stat.S_ISLNK(st.st_mode):
            return CacheLayoutError(f"{path} in Tart's cache is not a directory; move it away and pull again")
        target = os.readlink(path)
        if self._sibling_digest_dir(path, target) is not None:
            return CacheLayoutError(
                f"{path} is the tag link of {self._name_of(path)}, so no image can be stored under it: Tart's cache "
                "cannot hold both that tag and a repository of the same name; remove that tag (tart delete, "
                "tartflow prune) or pull under another name"
            )
        return CacheLayoutError(
            f"{path} is a symbolic link (to {target}) inside Tart's cache, and tartflow never writes or deletes "
            "through one: replace it with a real directory (or remove the link) and pull again"
        )

    def _name_of(self, link: Path) -> str:
        """``host/ns:tag`` of a tag link's path."""
        host, *namespace, tag = link.relative_to(self.oci_root).parts
        return f"{host.replace('%3A', ':')}/{'/'.join(namespace)}:{tag}"

    @staticmethod
    def _sibling_digest_dir(link: Path, target: str) -> Path | None:
        """The real digest directory beside ``link`` that ``target`` names (however spelled), or
        None: a tag Tart or tartflow wrote, as opposed to a link somewhere else."""
        name = Path(target).name
        sibling = link.parent / name
        if not name.startswith("sha256:"):
            return None
        try:
            if not stat.S_ISDIR(os.lstat(sibling).st_mode):
                return None
        except OSError:
            return None
        same = os.path.realpath(link.parent / target) == os.path.realpath(sibling)
        return sibling if same else None

    def check_layout(self, ref: Reference, digest: str) -> Path:
        """The digest directory of ``ref`` at ``digest``, once nothing a pull of it would write
        through is a link or a non-directory (missing is fine); else CacheLayoutError."""
        target = self.digest_dir(ref, digest)
        self._walk(target, create=False)
        if ref.tag is not None:
            link = self.repo_dir(ref) / ref.tag
            try:
                st = os.lstat(link)
            except FileNotFoundError:
                return target
            if stat.S_ISDIR(st.st_mode):
                raise CacheLayoutError(
                    f"{link} is a directory (the repository {ref.host}/{ref.repository}/{ref.tag}), where the tag "
                    f"{ref} must be a link: Tart's cache cannot hold both; remove that repository's images "
                    "(tart delete, tartflow prune) or pull under another name"
                )
            if not stat.S_ISLNK(st.st_mode):
                raise CacheLayoutError(f"{link} in Tart's cache is not a tag link; move it away and pull again")
        return target

    # --- what is installed -------------------------------------------------------------------

    def installed(self, ref: Reference, digest: str) -> bool:
        """True when the digest directory holds an intact VM (intact.py); CacheLayoutError when a
        pull of ``ref`` would have to write through a link."""
        return intact.problem(self.check_layout(ref, digest)) is None

    def current(self, ref: Reference, digest: str) -> bool:
        """True when ``ref`` already names ``digest`` in the cache as an intact VM."""
        if not self.installed(ref, digest):
            return False
        if ref.tag is None:
            return True
        link = self.repo_dir(ref) / ref.tag
        return link.is_symlink() and os.readlink(link) == str(self.digest_dir(ref, digest))

    @contextmanager
    def host_lock(self, host: str) -> Iterator[None]:
        """Tart's own lock: ``flock`` on the host directory itself.

        A ``tart pull`` holds it for its whole download, so waiting is said out loud at once
        (hostlock.py) and stays interruptible: a stop request (Ctrl+C, SIGTERM) ends the wait.
        """
        self._walk(self.host_dir(host), create=True)
        with hostlock.held(self.host_dir(host)):
            yield

    def try_host_lock(self, host: str) -> AbstractContextManager[bool]:
        """The host lock if it is free now (yields True), else yields False without waiting."""
        self._walk(self.host_dir(host), create=True)
        return hostlock.held_if_free(self.host_dir(host))

    def install(self, ref: Reference, digest: str, staging: Path | None = None) -> Path:
        """Move a complete VM from ``staging`` into place (if given) and point the tag at it.

        Rename only: nothing half-written ever sits at a final path. If the digest directory
        already holds an intact VM, it is kept and ``staging`` removed ("already exists" is
        success); a real directory that does not (a damaged VM, a leftover) is renamed aside,
        replaced by ``staging`` and only then deleted. A pull by digest leaves
        ``.explicitly-pulled`` so Tart's GC keeps the untagged VM.
        """
        target = self.digest_dir(ref, digest)
        self._walk(target.parent, create=True)
        if staging is not None and os.stat(staging).st_dev != os.stat(target.parent).st_dev:
            raise StoreError(
                f"tartflow's store ({staging.parent}) and Tart's cache ({self.oci_root}) are on different "
                "file systems; set TARTFLOW_HOME to a directory on the same one as TART_HOME"
            )
        with self.host_lock(ref.host):
            self.check_layout(ref, digest)  # again, under the lock every writer of this host takes
            if staging is not None and intact.problem(target) is None:
                shutil.rmtree(staging, ignore_errors=True)
            elif staging is not None:
                self._replace(target, staging)
            if (reason := intact.problem(target)) is not None:
                raise StoreError(f"{target} is not a complete VM ({reason}); run the pull again")
            if ref.tag is not None:
                self._link_tag(ref, target)
                collect_host(self, ref.host)  # as Tart: link() then gc(), under the same lock
            else:
                _touch(target / EXPLICITLY_PULLED)
        self.mark_accessed(target)
        return target

    @staticmethod
    def _replace(target: Path, staging: Path) -> None:
        """Put ``staging`` at ``target`` (a real directory or nothing, as checked under the lock)."""
        aside = None
        if os.path.lexists(target):
            aside = target.with_name(f".{target.name}.{os.getpid()}.replaced")
            os.rename(target, aside)
        os.rename(staging, target)
        fsync_dir(target.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)  # a real directory; rmtree never follows links inside

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
        left = self._sibling_digest_dir(link, previous) if previous else None
        if left is not None:
            # As Tart does: the image the tag left goes first when Tart prunes by access time.
            # Only a digest directory beside the tag: an old link to anywhere else is not followed.
            os.utime(left, (0, os.lstat(left).st_mtime), follow_symlinks=False)

    def mark_accessed(self, path: Path) -> None:
        """A fresh access time on digest directory ``path``, once it is checked to be a real
        directory inside ``OCIs/`` (never through a link, never outside the cache)."""
        self._walk(path, create=False, missing_ok=False)
        os.utime(path, (time.time(), os.lstat(path).st_mtime), follow_symlinks=False)

    def list(self) -> list[CachedImage]:
        """Every tag and digest entry, like ``tart list --source oci``. Symbolic links are not
        followed: a linked host directory is left out, and a tag is listed only when it points
        at a digest directory beside it."""
        images: list[CachedImage] = []
        if not self.oci_root.is_dir():
            return images
        for host_dir in sorted(p for p in self.oci_root.iterdir() if p.is_dir() and not p.is_symlink()):
            host = host_dir.name.replace("%3A", ":")
            for dirpath, dirnames, filenames in os.walk(host_dir):
                here = Path(dirpath)
                repo = "/".join(here.relative_to(host_dir).parts)
                for name in sorted(dirnames + filenames):
                    entry = here / name
                    if name.startswith("sha256:") and not entry.is_symlink() and self.is_vm(entry):
                        images.append(_describe(f"{host}/{repo}@{name}", name, entry))
                    elif entry.is_symlink():
                        target = self._sibling_digest_dir(entry, os.readlink(entry))
                        if target is not None and self.is_vm(target):
                            images.append(_describe(f"{host}/{repo}:{name}", target.name, target))
                dirnames[:] = [d for d in dirnames if not d.startswith("sha256:")]
        return images


def _touch(path: Path) -> None:
    """Create ``path`` if missing, never through a symbolic link (O_NOFOLLOW)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if os.path.islink(path):
            raise CacheLayoutError(
                f"{path} is a symbolic link, and tartflow never writes through one in Tart's cache: "
                "remove the link and pull again"
            ) from exc
        raise
    os.close(fd)


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
