"""tartflow's content store, containerd-style.

Layout under the store root (default ``$TART_HOME/tartflow``, beside Tart's own directories and
on the same file system, so a finished VM moves into Tart's cache with one rename; never under
``$TART_HOME/tmp``, which Tart wipes)::

    blobs/sha256/<hex>            committed blobs: size and digest verified, fsynced
    ingest/sha256/<hex>/data      a download in progress: the first N bytes of the blob
    locks/blobs/<hex>.lock        held (flock, via filelock) by the one process fetching it
    locks/blobs/<hex>.owner       who holds the lock and since when (pid, host, time)
    manifests/sha256/<hex>        manifests as the registry sent them
    staging/<manifest hex>/       a VM being assembled (see staging.py)
    locks/<manifest hex>/         its lock files

Lock files are never deleted (they are empty): deleting one while another process opens it
would let two processes hold the same lock.

Invariants: a file under ``blobs/`` is complete and verified; "already exists" is success; a
partial is only ever appended to (or discarded after a digest mismatch) and survives any crash.
The store knows blobs and manifests by digest only; what a staging VM needs is staging.py's.

The contract of one download (``Store.ingest``), after containerd's content store: the holder
of a blob's lock appends to its partial (``offset`` says how much is there, whatever a crash
left), then ``commit(size, digest)``. Commit checks both against what it is moving (the size
from the file itself, the digest from the caller's running hash of the bytes it appended, or
by reading the partial back) and only then makes the partial durable and renames it into
``blobs/``. A partial shorter than ``size`` is kept (a later run resumes it); one longer, or
with another digest, is discarded (no resume can make it right). A blob that is already
committed makes commit succeed at once, dropping the partial.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

import filelock

from . import cancel
from .errors import DigestMismatchError, InsufficientSpaceError, StoreError
from .reference import digest_hex

__all__ = ["Ingest", "Store", "atomic_write", "fsync_dir", "is_locked", "translate_os_errors"]

_READ = 4 * 1024 * 1024

F = TypeVar("F", bound=Callable[..., Any])


def translate_os_errors(fn: F) -> F:
    """Turn an OSError from the file system into one line a user can act on; bytes already
    on disk stay there for the next run."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise InsufficientSpaceError(
                    f"out of disk space{where}; everything fetched so far is kept: "
                    "free some space (tart prune, tartflow gc) and run the same command again"
                ) from None
            raise StoreError(f"file system error{where}: {exc.strerror or exc}; "
                             "fix it and run the same command again") from None

    return wrapper  # type: ignore[return-value]


def fsync_dir(path: Path) -> None:
    """Persist a rename or creation in ``path``; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename: never half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def is_locked(lock_path: Path) -> bool:
    """True while some process (this one included) holds the filelock at ``lock_path``."""
    if not lock_path.exists():
        return False
    lock = filelock.FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return True
    lock.release()
    return False


class Store:
    """The content store rooted at ``root``; safe for many threads and processes at once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("blobs/sha256", "ingest/sha256", "manifests/sha256", "staging", "locks/blobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- committed content -------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest_hex(digest)

    def has_blob(self, digest: str, size: int) -> bool:
        try:
            return self.blob_path(digest).stat().st_size == size
        except FileNotFoundError:
            return False

    def manifest_path(self, digest: str) -> Path:
        return self.root / "manifests" / "sha256" / digest_hex(digest)

    def put_manifest(self, digest: str, raw: bytes) -> Path:
        path = self.manifest_path(digest)
        if not path.exists():
            atomic_write(path, raw)
        return path

    def read_manifest(self, digest: str) -> bytes:
        try:
            return self.manifest_path(digest).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"manifest {digest} is not in tartflow's store; pull the image again") from None

    # -- downloads in progress -----------------------------------------------------------
    def ingest_dir(self, digest: str) -> Path:
        return self.root / "ingest" / "sha256" / digest_hex(digest)

    def _lock_base(self, digest: str) -> Path:
        return self.root / "locks" / "blobs" / digest_hex(digest)

    def blob_lock(self, digest: str) -> Path:
        """The lock of one blob's download; in ``locks/``, which nothing deletes, because a
        lock file deleted while another process opens it lets two processes hold "the" lock."""
        return self._lock_base(digest).with_suffix(".lock")

    @contextmanager
    def ingest(self, digest: str, *, on_wait: Callable[[str], None] | None = None) -> Iterator[Ingest]:
        """Hold the download of ``digest`` for this process; waits while another holds it."""
        lock = self._acquire(digest, on_wait)
        owner = self._lock_base(digest).with_suffix(".owner")
        try:
            owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
            directory = self.ingest_dir(digest)
            directory.mkdir(parents=True, exist_ok=True)
            yield Ingest(self, digest, directory)
        finally:
            owner.unlink(missing_ok=True)
            if self.blob_path(digest).exists():
                shutil.rmtree(self.ingest_dir(digest), ignore_errors=True)  # only ever touched under the lock
            lock.release()

    def wait_for_ingest(self, digest: str, *, on_wait: Callable[[str], None] | None = None) -> bool:
        """Wait while another download of ``digest`` is in progress; True if there was one.

        What it leaves (a committed blob, or a layer verified into its staging VM) may spare
        the caller a download of its own.
        """
        if not self.ingest_is_locked(digest):
            return False
        self._acquire(digest, on_wait).release()
        return True

    def _acquire(self, digest: str, on_wait: Callable[[str], None] | None) -> filelock.FileLock:
        """The download lock of ``digest``, held; waits (telling ``on_wait`` once) while another has it."""
        lock = filelock.FileLock(self.blob_lock(digest))
        waited = False
        while True:
            cancel.check()
            try:
                lock.acquire(timeout=0.5)
                return lock
            except filelock.Timeout:
                if on_wait and not waited:
                    on_wait(self.lock_holder(digest))
                waited = True

    def lock_holder(self, digest: str) -> str:
        """Who holds the download lock of ``digest``, in words ("pid 123 on mac-7 for 40 s")."""
        try:
            owner = json.loads(self._lock_base(digest).with_suffix(".owner").read_text())
            age = time.time() - float(owner["since"])
            return f"pid {owner['pid']} on {owner['host']} for {age:.0f} s"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def ingest_is_locked(self, digest: str) -> bool:
        return is_locked(self.blob_lock(digest))


class Hash(Protocol):
    """A running SHA-256 (hashlib's, or sha256.Sha256)."""

    def hexdigest(self) -> str: ...


class Ingest:
    """One locked download: append to ``data``, then ``commit`` it into ``blobs/``."""

    def __init__(self, store: Store, digest: str, directory: Path) -> None:
        self.store = store
        self.digest = digest
        self.data = directory / "data"

    def offset(self) -> int:
        """Bytes in the partial now (0 if there is none): where a resume goes on from."""
        try:
            return self.data.stat().st_size
        except FileNotFoundError:
            return 0

    def open_append(self) -> BinaryIO:
        return open(self.data, "ab")

    def discard(self) -> None:
        self.data.unlink(missing_ok=True)

    def commit(self, size: int, digest: str, *, running_hash: Hash | None = None) -> Path:
        """Check the partial against ``size`` and ``digest``, then make it durable and move it
        into ``blobs/``; returns the committed path.

        ``running_hash`` is the caller's SHA-256 of every byte it appended (saves reading the
        partial back); without it the partial is hashed from disk. Either way the digest is
        compared here. A mismatch raises DigestMismatchError with nothing at the final path: a
        short partial stays for a resume, a long or wrong one is discarded. A blob already
        committed is success.
        """
        if digest != self.digest:
            raise StoreError(f"commit of {digest} into the download of {self.digest}")
        target = self.store.blob_path(digest)
        if self.store.has_blob(digest, size):
            self.discard()
            return target
        with open(self.data, "rb+") as f:
            have = os.fstat(f.fileno()).st_size
            if have != size:
                if have > size:
                    self.discard()
                raise DigestMismatchError(f"blob {digest[:19]}: {have} bytes received, the descriptor says {size}")
            actual = "sha256:" + (running_hash.hexdigest() if running_hash is not None else _sha256_of(f))
            if actual != digest:
                self.discard()
                raise DigestMismatchError(f"blob {digest[:19]}: sha256 of the bytes received differs")
            os.fsync(f.fileno())
        os.replace(self.data, target)
        fsync_dir(target.parent)
        return target


def _sha256_of(f: BinaryIO) -> str:
    hasher = hashlib.sha256()
    f.seek(0)
    while chunk := f.read(_READ):
        hasher.update(chunk)
    return hasher.hexdigest()
