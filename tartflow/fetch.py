"""Fetch one blob into the store: resumable, verified while streaming, committed only when right.

A partial download survives anything (dropped connection, failed task, Ctrl+C, kill -9): the
next attempt asks only for the rest with a Range request. ``fetch_blob`` picks, once, one of
two ways to keep what arrived:

- ``_KeptPartial``: the compressed bytes are appended to the store's partial; a resume
  re-hashes it from disk (local, fast) and feeds it again to the layer's decoder, if any.
- ``_FromCheckpoint``: a disk layer decoded on the way in keeps no compressed bytes; a resume
  goes on from the layer's checkpoint (checkpoint.py; only the layer's decoded part is
  re-read, to check it).

A blob whose bytes do not match its descriptor (or, decoded on the way in, do not decode) is
discarded and fetched again, at most ``RetryPolicy.max_digest_mismatches`` times. A disk layer
whose compressed digest matched but which decodes wrong is permanent: the image is corrupt.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
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
    from .disk import LayerDecoder
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
    mirror: int = 0  # of ``fetched``, the bytes a pull-through mirror sent (the rest: the registry)


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
        download: _Download
        if fill is not None and checkpoint.possible() and ingest.offset() == 0 and not keep():
            download = _FromCheckpoint(client, repository, desc, policy.max_digest_mismatches, fill)
        else:
            decoder = fill.decoder() if fill is not None else None
            download = _KeptPartial(client, repository, desc, policy.max_digest_mismatches, ingest, decoder)
        reporter().skip(download.offset)
        resumed_from = download.offset
        try:
            retrying(download.attempt, policy, on_wait=_report_wait)
        except BaseException:
            download.save_progress()  # Ctrl+C, retries exhausted, a full disk: resume from here
            raise
        path = ""
        if fill is not None:
            fill.mark_done()  # under the blob's lock: no other process resumes from the partial meanwhile
        if isinstance(download, _KeptPartial) and (fill is None or keep()):
            path = str(ingest.commit(desc.size, desc.digest, running_hash=download.hasher))
        else:
            ingest.discard()
    return FetchResult(desc.digest, desc.size, path, download.fetched, resumed_from, time.monotonic() - started,
                       verified=fill is not None, mirror=download.mirrored)


def waiting_note(desc: Descriptor, holder: str) -> None:
    reporter().note(f"layer {desc.digest[:19]} is being fetched by {holder}; waiting for it")


def _already_there(store: Store, desc: Descriptor) -> FetchResult:
    reporter().skip(desc.size)
    return FetchResult(desc.digest, desc.size, str(store.blob_path(desc.digest)), 0, desc.size, 0.0)


def _report_wait(exc: TartflowError, seconds: float) -> None:
    reporter().waiting(exc.message, seconds)


class _Download:
    """One blob's download across attempts: ``offset`` bytes received, ``hasher`` their running
    SHA-256, ``decoder`` the disk layer they are decoded into (if any). Subclasses keep what
    arrived for a resume (``_take``, ``save_progress``, ``restart``)."""

    hasher: Any
    decoder: LayerDecoder | None

    def __init__(self, client: BlobSource, repository: str, desc: Descriptor, max_mismatches: int) -> None:
        self.client, self.repository, self.desc = client, repository, desc
        self.offset = self.fetched = self.mirrored = 0
        self.mismatches, self.max_mismatches = 0, max_mismatches

    def save_progress(self) -> None:
        """Called when the download stops for good (best effort): keep what a resume needs."""

    def _take(self, chunks: Iterable[bytes]) -> None:
        raise NotImplementedError

    def _new_hasher(self) -> Any:
        return hashlib.sha256()

    def restart(self) -> None:
        """Drop what arrived: the download starts over from the blob's first byte."""
        reporter().skip(-self.offset)
        self.hasher, self.offset = self._new_hasher(), 0
        if self.decoder is not None:
            self.decoder.reset()

    def attempt(self) -> None:
        """One request for the bytes still missing, then, once all are in, the checks.

        Bytes that do not match the descriptor are dropped at once and raised as temporary;
        the ``max_mismatches``-th such fetch is permanent (the registry serves bad data). A
        disk layer that decodes wrong although its compressed digest matched is permanent.
        """
        try:
            if self.offset < self.desc.size:
                self._stream()
            self._verify()
        except CorruptLayerError as exc:
            self.restart()
            raise CorruptLayerError(f"{exc.message}; the image in the registry is corrupt: re-push it") from exc
        except DigestMismatchError as exc:
            self.restart()
            self.mismatches += 1
            if self.mismatches < self.max_mismatches:
                raise
            raise DigestMismatchError(
                f"blob {self.desc.digest} of {self.repository} failed verification {self.mismatches} times "
                f"({exc.message}); the registry is serving corrupt data", temporary=False,
            ) from exc

    def _verify(self) -> None:
        """All bytes in: their size and sha256 against the descriptor, then the decoded layer's
        size and content digest (CorruptLayerError: the compressed digest matched by then)."""
        size = self.desc.size
        if self.offset != size:
            raise RegistryError(
                f"blob {self.desc.digest[:19]}: stream ended at {self.offset} of {size} bytes", temporary=True
            )
        if "sha256:" + self.hasher.hexdigest() != self.desc.digest:
            raise DigestMismatchError(f"blob {self.desc.digest[:19]}: sha256 of the bytes received differs")
        if self.decoder is not None:
            self.decoder.verify()

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
                fetched = self.fetched
                try:
                    self._take(blob.iter_bytes())
                finally:
                    if blob.mirror:
                        self.mirrored += self.fetched - fetched
        except RegistryError as exc:
            if self.offset > before:  # bytes arrived: the retry need not wait long
                raise exc.with_progress(True) from exc
            raise
        except CorruptLayerError as exc:  # unverified bytes that do not decode: not the blob's
            raise DigestMismatchError(exc.message) from exc

    def _too_long(self) -> DigestMismatchError:
        return DigestMismatchError(
            f"blob {self.desc.digest[:19]} is longer than the {self.desc.size} bytes its descriptor says"
        )


class _KeptPartial(_Download):
    """The compressed bytes are appended to the store's partial (and fed to ``decoder``, if
    any); a resume hashes and decodes the partial again from disk."""

    def __init__(
        self, client: BlobSource, repository: str, desc: Descriptor, max_mismatches: int,
        ingest: Ingest, decoder: LayerDecoder | None,
    ) -> None:
        super().__init__(client, repository, desc, max_mismatches)
        self.ingest, self.decoder = ingest, decoder
        self.hasher = self._new_hasher()
        self.offset = self._rehash()

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
        super().restart()

    def _take(self, chunks: Iterable[bytes]) -> None:
        size, reporter_, decoder = self.desc.size, reporter(), self.decoder
        with self.ingest.open_append() as out:
            for chunk in chunks:
                if len(chunk) > size - self.offset:
                    raise self._too_long()
                out.write(chunk)
                self.hasher.update(chunk)
                self.offset += len(chunk)
                self.fetched += len(chunk)
                if decoder is not None:
                    decoder.feed(chunk)
                reporter_.advance(len(chunk))
                cancel.check()


class _FromCheckpoint(_Download):
    """No compressed bytes are kept: they only go through the layer's decoder, whose state
    and the blob's running hash (``Sha256``, which can save its state) are checkpointed as
    the download goes; a resume goes on from the newest checkpoint."""

    decoder: LayerDecoder

    def __init__(self, client: BlobSource, repository: str, desc: Descriptor, max_mismatches: int,
                 fill: LayerFill) -> None:
        super().__init__(client, repository, desc, max_mismatches)
        self.fill = fill
        self.decoder, self.offset, self.hasher = fill.resume(desc.digest)
        self.saved, self.saved_at = self.offset, time.monotonic()  # offset and time of the last checkpoint
        self.consistent = True  # hash, decoder and offset agree (false while a chunk is half taken)

    def _new_hasher(self) -> Any:
        return Sha256()

    def restart(self) -> None:
        super().restart()
        self.fill.drop_checkpoints()
        self.saved = 0

    def _checkpoint_due(self) -> bool:
        """Every ``EVERY`` bytes, or every ``EVERY_SECONDS`` once more bytes came in than the
        checkpoint would carry (so a slow download of big blocks never writes more than it gets)."""
        progress = self.offset - self.saved
        return progress >= checkpoint.EVERY or (
            time.monotonic() - self.saved_at >= checkpoint.EVERY_SECONDS and progress >= self.decoder.pending)

    def save_progress(self) -> None:
        """Save a checkpoint; when one cannot be saved (a full disk, a corrupt stream), the last stays."""
        if not self.consistent or self.offset <= self.saved:
            return
        try:
            self.fill.save_checkpoint(self.desc.digest, self.offset, self.hasher.state())
        except (OSError, RuntimeError):
            return
        self.saved, self.saved_at = self.offset, time.monotonic()

    def _take(self, chunks: Iterable[bytes]) -> None:
        size, reporter_, decoder = self.desc.size, reporter(), self.decoder
        for chunk in chunks:
            if len(chunk) > size - self.offset:
                raise self._too_long()
            self.consistent = False
            self.hasher.update(chunk)
            self.offset += len(chunk)
            self.fetched += len(chunk)
            try:
                decoder.feed(chunk)
            except OSError:  # a full disk: what was not written waits in the decoder
                self.consistent = True
                raise
            self.consistent = True
            reporter_.advance(len(chunk))
            if self._checkpoint_due():
                self.save_progress()
            cancel.check()
