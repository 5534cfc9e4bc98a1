"""The content store's contract, after containerd's conformance suite: no registry, no Prefect.

A download appends to its partial under the blob's lock and survives being put down and
picked up again; ``commit(size, digest)`` checks what it commits and lets nothing wrong reach
``blobs/``; a blob already there is success; a held lock says who holds it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tartflow.errors import DigestMismatchError
from tartflow.store import Store

BLOB = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
HALF = len(BLOB) // 2


def _blob_files(store: Store) -> list[Path]:
    return list((store.root / "blobs" / "sha256").iterdir())


def test_a_partial_is_resumed_after_reopening_and_committed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.ingest(DIGEST) as ingest:
        assert ingest.offset() == 0
        with ingest.open_append() as out:
            out.write(BLOB[:HALF])
    # Put down (lock released, as after a crash or a failed task) and picked up by a new store.
    store = Store(tmp_path)
    assert not store.has_blob(DIGEST, len(BLOB))
    with store.ingest(DIGEST) as ingest:
        assert ingest.offset() == HALF
        with ingest.open_append() as out:
            out.write(BLOB[HALF:])
        path = ingest.commit(len(BLOB), DIGEST)
    assert path == store.blob_path(DIGEST) and path.read_bytes() == BLOB
    assert store.has_blob(DIGEST, len(BLOB))
    assert not store.ingest_dir(DIGEST).exists()  # nothing of the download is left behind


def test_a_running_hash_saves_the_read_back_but_is_still_checked(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.ingest(DIGEST) as ingest:
        ingest.data.write_bytes(BLOB)
        assert ingest.commit(len(BLOB), DIGEST, running_hash=hashlib.sha256(BLOB)).read_bytes() == BLOB
    other = os.urandom(100)
    other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
    with store.ingest(other_digest) as ingest:
        ingest.data.write_bytes(other)
        with pytest.raises(DigestMismatchError):  # a caller's hash of something else is refused
            ingest.commit(len(other), other_digest, running_hash=hashlib.sha256(b"not the bytes"))
    assert not store.blob_path(other_digest).exists()


def test_a_truncated_partial_resumes_from_what_is_there_and_never_commits_short(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.ingest(DIGEST) as ingest:
        ingest.data.write_bytes(BLOB)
    with open(store.ingest_dir(DIGEST) / "data", "rb+") as f:
        f.truncate(HALF - 1000)  # the file system lost the tail (a crash before it was written out)
    with store.ingest(DIGEST) as ingest:
        assert ingest.offset() == HALF - 1000
        with pytest.raises(DigestMismatchError, match=f"{HALF - 1000} bytes received, the descriptor says {len(BLOB)}"):
            ingest.commit(len(BLOB), DIGEST)
        assert not store.blob_path(DIGEST).exists() and _blob_files(store) == []
        assert ingest.offset() == HALF - 1000  # a short partial is kept for the resume
        with ingest.open_append() as out:
            out.write(BLOB[HALF - 1000 :])
        assert ingest.commit(len(BLOB), DIGEST).read_bytes() == BLOB


def test_a_partial_longer_than_the_blob_is_refused_and_discarded(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.ingest(DIGEST) as ingest:
        ingest.data.write_bytes(BLOB + b"extra")
        with pytest.raises(DigestMismatchError, match="bytes received, the descriptor says"):
            ingest.commit(len(BLOB), DIGEST)
        assert ingest.offset() == 0
    assert not store.blob_path(DIGEST).exists() and _blob_files(store) == []


def test_a_digest_mismatch_lands_nothing_and_discards_the_partial(tmp_path: Path) -> None:
    store = Store(tmp_path)
    wrong = bytearray(BLOB)
    wrong[HALF] ^= 1
    with store.ingest(DIGEST) as ingest:
        ingest.data.write_bytes(bytes(wrong))
        with pytest.raises(DigestMismatchError, match="sha256 of the bytes received differs"):
            ingest.commit(len(BLOB), DIGEST)
        assert ingest.offset() == 0  # no resume can make these bytes right
    assert not store.blob_path(DIGEST).exists() and _blob_files(store) == []
    assert not store.has_blob(DIGEST, len(BLOB))


def test_commit_of_a_blob_already_there_is_success(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.ingest(DIGEST) as ingest:
        ingest.data.write_bytes(BLOB)
        first = ingest.commit(len(BLOB), DIGEST)
    inode = first.stat().st_ino
    with store.ingest(DIGEST) as ingest:  # a second download of the same blob finishing later
        ingest.data.write_bytes(BLOB)
        assert ingest.commit(len(BLOB), DIGEST) == first
        assert ingest.offset() == 0  # its partial is dropped
    assert first.stat().st_ino == inode and first.read_bytes() == BLOB  # the committed blob untouched
    assert not store.ingest_dir(DIGEST).exists()


_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tartflow.store import Store

    root, digest, flags = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    with Store(root).ingest(digest):
        (flags / "held").touch()
        deadline = time.monotonic() + 30
        while not (flags / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # still held a moment after the waiter asked: it must not get in meanwhile
        (flags / "left").touch()
""")


def test_a_held_blob_lock_names_its_holder_and_is_waited_for(tmp_path: Path) -> None:
    store, flags = Store(tmp_path / "store"), tmp_path / "flags"
    flags.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(store.root), DIGEST, str(flags)])
    try:
        deadline = time.monotonic() + 60
        while not (flags / "held").exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder process did not start"
            time.sleep(0.05)
        named = f"pid {holder.pid} on {socket.gethostname()} for "
        assert store.ingest_is_locked(DIGEST)
        assert store.lock_holder(DIGEST).startswith(named)
        notes: list[str] = []

        def on_wait(who: str) -> None:
            notes.append(who)
            (flags / "release").touch()

        started = time.monotonic()
        with store.ingest(DIGEST, on_wait=on_wait) as ingest:
            assert (flags / "left").exists(), "got the blob's lock while another process held it"
            assert ingest.offset() == 0
        assert len(notes) == 1 and notes[0].startswith(named) and notes[0].endswith(" s")
        assert time.monotonic() - started < 30
        assert holder.wait(timeout=30) == 0
        assert not store.ingest_is_locked(DIGEST)
        assert store.lock_holder(DIGEST) == "another process"  # no holder once released
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
