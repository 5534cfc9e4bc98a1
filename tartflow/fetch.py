"""Fetch one blob into the store: resumable, verified while streaming, committed only when right.

A partial download survives anything (dropped connection, failed task, Ctrl+C, kill -9): the
next attempt asks only for the rest with a Range request, after re-hashing the partial from
disk (local, fast) or, for a disk layer decoded on the way in, from the layer's checkpoint
(checkpoint.py: no compressed bytes kept; only the layer's decoded part is re-read, to check it). A blob whose bytes do not match its
descriptor is discarded and fetched again, at most ``RetryPolicy.max_digest_mismatches`` times.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import cancel, checkpoint
from .errors import CorruptLayerError, DigestMismatchError, RegistryError, TartflowError
from .manifest import Descriptor
from .progress import reporter
from .registry.mirrors import BlobSource
from .registry.retry import RetryPolicy, retrying
from .sha256 import Sha256
from .store import Ingest, Store

if TYPE_CHECKING:
    from .staging import LayerFill

__all__ = ["FetchResult", "fetch_blob", "waiting_note"]

_REHASH_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class FetchResult:
    """What one fetch did; small and serialisable (a Prefect task result)."""

    digest: str
    size: int
    path: str
    fetched: int  # bytes moved over the wire by this call
    resumed_from: int  # bytes already on disk when this call started
    seconds: float
    reused: int = 0  # bytes not fetched because a VM in Tart's cache already had the layer
    verified: bool = False  # already verified into the staging VM: verify has nothing left to do
    peer: int = 0  # bytes received from peers (tartflow.peer) instead of mirrors or the registry


def fetch_blob(
    store: Store, client: BlobSource, repository: str, desc: Descriptor, policy: RetryPolicy,
    fill: LayerFill | None = None, keep: Callable[[], bool] = lambda: True,
) -> FetchResult:
    """Make ``desc`` a committed blob in ``store``; returns at once if it already is.

    With a ``fill``, the disk layer is decoded into the staging VM as its bytes arrive, so
    nothing is read back; bytes that do not decode count as a digest mismatch. Unless
    ``keep()`` says another pull needs the compressed bytes (or a partial of them is already
    on disk, or checkpoints cannot work here), they are not written at all: the layer saves
    checkpoints instead and resumes from them. Once both digests match, the layer is marked
    done; the decoded layer is what is kept (the result's ``path`` is then empty).
    """
    started = time.monotonic()
    if store.has_blob(desc.digest, desc.size):
        return _already_there(store, desc)

    with store.ingest(desc.digest, on_wait=lambda holder: waiting_note(desc, holder)) as ingest:
        if store.has_blob(desc.digest, desc.size):  # another process finished it meanwhile
            return _already_there(store, desc)
        # Decoded on the way in, the compressed bytes are kept only while someone else wants
        # them or a partial of them is already on disk; else checkpoints make them resumable.
        streaming = fill is not None and checkpoint.possible() and ingest.offset() == 0 and not keep()
        download = _Download(ingest, client, repository, desc, policy.max_digest_mismatches, fill, streaming)
        reporter().skip(download.offset)
        resumed_from = download.offset
        try:
            retrying(download.attempt, policy, on_wait=_report_wait)
        except BaseException:
            download.save_checkpoint()  # Ctrl+C, retries exhausted, a full disk: resume from here
            raise
        path = ""
        if fill is not None:
            fill.finish()  # under the blob's lock: no other process resumes from the partial meanwhile
        if fill is None or (not streaming and keep()):
            path = str(ingest.commit())
        else:
            ingest.discard()
    return FetchResult(desc.digest, desc.size, path, download.fetched, resumed_from, time.monotonic() - started,
                       verified=fill is not None)


def waiting_note(desc: Descriptor, holder: str) -> None:
    reporter().note(f"layer {desc.digest[:19]} is being fetched by {holder}; waiting for it")


def _already_there(store: Store, desc: Descriptor) -> FetchResult:
    reporter().skip(desc.size)
    return FetchResult(desc.digest, desc.size, str(store.blob_path(desc.digest)), 0, desc.size, 0.0)


def _report_wait(exc: TartflowError, seconds: float) -> None:
    reporter().waiting(exc.message, seconds)


class _Download:
    """The state of one download across attempts: bytes received, their running hash, and
    either the bytes themselves on disk or, ``streaming``, the fill's checkpoints."""

    def __init__(
        self, ingest: Ingest, client: BlobSource, repository: str, desc: Descriptor, max_mismatches: int,
        fill: LayerFill | None, streaming: bool,
    ) -> None:
        self.ingest, self.client, self.repository, self.desc = ingest, client, repository, desc
        self.fill, self.streaming = fill, streaming
        self.decoder = fill.decoder if fill is not None else None
        self.fetched = 0
        self.mismatches, self.max_mismatches = 0, max_mismatches
        self.hasher = self._new_hasher()
        self.saved, self.saved_at = 0, time.monotonic()  # offset and time of the last checkpoint
        self.consistent = True  # hash, decoder and offset agree (false while a chunk is half taken)
        self.offset = self._resume() if streaming else self._rehash()

    def _resume(self) -> int:
        """Go on from the layer's checkpoint, if there is one this run can use."""
        assert self.fill is not None
        found = self.fill.checkpointed(self.desc.digest)
        self.decoder = self.fill.decoder
        if found is None:
            return 0
        self.saved, self.hasher = found
        return self.saved

    def _new_hasher(self) -> Any:
        """A hash whose state a checkpoint can save when streaming, else hashlib's."""
        return Sha256() if self.streaming else hashlib.sha256()

    def _checkpoint_due(self) -> bool:
        """Every ``EVERY`` bytes, or every ``EVERY_SECONDS`` once more bytes came in than the
        checkpoint would carry (so a slow download of big blocks never writes more than it gets)."""
        assert self.decoder is not None
        progress = self.offset - self.saved
        return progress >= checkpoint.EVERY or (
            time.monotonic() - self.saved_at >= checkpoint.EVERY_SECONDS and progress >= self.decoder.pending)

    def save_checkpoint(self) -> None:
        """Best effort: when one cannot be saved (a full disk, a corrupt stream), the last stays."""
        if not self.streaming or not self.consistent or self.offset <= self.saved:
            return
        assert self.fill is not None
        try:
            self.fill.save_checkpoint(self.desc.digest, self.offset, self.hasher.state())
        except (OSError, RuntimeError):
            return
        self.saved, self.saved_at = self.offset, time.monotonic()

    def _rehash(self) -> int:
        """Hash the partial left by an earlier run; a partial longer than the blob is discarded."""
        offset = self.ingest.offset()
        if offset > self.desc.size:
            self.ingest.discard()
            return 0
        try:
            with open(self.ingest.data, "rb") as f:
                while offset and (chunk := f.read(_REHASH_CHUNK)):
                    self.hasher.update(chunk)
                    if self.decoder is not None:
                        self.decoder.feed(chunk)
        except (FileNotFoundError, CorruptLayerError):  # no partial, or one that cannot be right
            self.ingest.discard()
            self.hasher = self._new_hasher()
            if self.decoder is not None:
                self.decoder.reset()
            return 0
        return offset

    def restart(self) -> None:
        self.ingest.discard()
        reporter().skip(-self.offset)
        self.hasher, self.offset = self._new_hasher(), 0
        if self.decoder is not None:
            self.decoder.reset()
        if self.fill is not None and self.streaming:
            self.fill.drop_checkpoint()
            self.saved = 0

    def attempt(self) -> None:
        """One request for the bytes still missing; raises temporary errors to be retried.

        Bytes that do not match the descriptor are discarded at once; after
        ``max_mismatches`` such fetches the error is permanent (the registry serves bad data).
        """
        try:
            self._attempt()
        except DigestMismatchError as exc:
            self.restart()
            self.mismatches += 1
            exc.temporary = self.mismatches < self.max_mismatches
            if not exc.temporary:
                exc.message = (f"blob {self.desc.digest} of {self.repository} failed verification "
                               f"{self.mismatches} times ({exc.message}); the registry is serving corrupt data")
            raise

    def _attempt(self) -> None:
        size = self.desc.size
        if self.offset < size:
            self._stream()
        if self.offset != size:
            raise RegistryError(
                f"blob {self.desc.digest[:19]}: stream ended at {self.offset} of {size} bytes", temporary=True
            )
        if "sha256:" + self.hasher.hexdigest() != self.desc.digest:
            raise DigestMismatchError(f"blob {self.desc.digest[:19]}: sha256 of the bytes received differs")
        if self.decoder is not None:
            self.decoder.finish()  # decoded size and content digest

    def _stream(self) -> None:
        before = self.offset
        try:
            with self.client.open_blob(self.repository, self.desc.digest, self.offset) as blob:
                if blob.total is not None and blob.total != self.desc.size:
                    raise DigestMismatchError(
                        f"blob {self.desc.digest[:19]}: registry says it is {blob.total} bytes, "
                        f"the manifest says {self.desc.size}"
                    )
                if blob.start != self.offset:  # the server ignored our Range: start over
                    self.restart()
                self._receive(blob.iter_bytes())
        except RegistryError as exc:
            exc.progressed = self.offset > before  # type: ignore[attr-defined]
            raise

    def _receive(self, chunks) -> None:
        size, reporter_ = self.desc.size, reporter()
        with nullcontext() if self.streaming else self.ingest.open_append() as out:
            for chunk in chunks:
                if len(chunk) > size - self.offset:
                    raise DigestMismatchError(
                        f"blob {self.desc.digest[:19]} is longer than the {size} bytes its descriptor says"
                    )
                self.consistent = False
                if out is not None:
                    out.write(chunk)
                self.hasher.update(chunk)
                self.offset += len(chunk)
                self.fetched += len(chunk)
                if self.decoder is not None:
                    try:
                        self.decoder.feed(chunk)
                    except OSError:  # a full disk: what was not written waits in the decoder
                        self.consistent = True
                        raise
                self.consistent = True
                reporter_.advance(len(chunk))
                if self.streaming and self._checkpoint_due():
                    self.save_checkpoint()
                cancel.check()
