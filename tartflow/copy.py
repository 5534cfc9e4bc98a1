"""``tartflow copy SRC DST``: copy a Tart image between registries, to seed a LAN registry once
for a whole fleet.

Blobs stream from the source straight into upload sessions on the destination (nothing lands
on local disk); blobs the destination already has are skipped; the manifest is pushed byte for
byte last, so its digest is unchanged and the image is never visible half-copied. Resumable:
each blob goes up in PATCHes of ``CHUNK`` bytes, each read whole from the source first (so
memory holds one chunk), and the session URL is saved after each one, so a failed or
interrupted copy continues from the last chunk the destination acknowledged. A PATCH cut
mid-body (the destination's link, or a kill while sending) makes the registry forget the
session; that blob then starts over. This runs without
Prefect: a copy is one operator's action, not a fleet job.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import cancel
from .context import PullContext
from .errors import DigestMismatchError, ImageFormatError, RegistryError
from .manifest import DOCKER_LIST, OCI_INDEX, Descriptor, media_type_of, parse_manifest
from .progress import reporter
from .reference import digest_hex, parse_reference
from .registry import push
from .registry.client import RegistryClient
from .registry.mirrors import BlobSource
from .registry.retry import retrying
from .store import atomic_write

__all__ = ["CHUNK", "CopyReport", "copy_image"]

#: Bytes per PATCH, the unit a failed copy can lose; ``$TARTFLOW_COPY_CHUNK`` (bytes, read when
#: a blob is sent, not at import) overrides it for links that drop often.
CHUNK = 64 * 1024 * 1024


def _chunk_size() -> int:
    return int(os.environ.get("TARTFLOW_COPY_CHUNK") or CHUNK)


@dataclass
class CopyReport:
    digest: str
    copied: int = 0  # bytes sent to the destination
    skipped: list[str] = field(default_factory=list)  # blobs the destination already had


def copy_image(ctx: PullContext, source: str, destination: str) -> CopyReport:
    src, dst = parse_reference(source), parse_reference(destination)
    src_client, dst_client = ctx.client(src), ctx.client(dst)
    if not isinstance(dst_client, RegistryClient):
        raise ImageFormatError("copy does not push through mirrors; unset TARTFLOW_MIRRORS for the destination")
    got = retrying(lambda: src_client.get_manifest(src.repository, src.reference), ctx.policy)
    if media_type_of(got.raw, got.media_type) in (OCI_INDEX, DOCKER_LIST):
        raise ImageFormatError(f"{source} is an image index; copy the Tart manifest it lists by digest")
    image = parse_manifest(got.raw, got.digest)
    stub = Descriptor.model_validate(json.loads(got.raw)["config"])
    report = CopyReport(got.digest)
    sessions = ctx.store.root / "uploads"
    sessions.mkdir(exist_ok=True)
    reporter().plan(image.compressed_size + stub.size, len(image.blobs) + 1)
    for desc in (stub, *image.blobs):
        if push.blob_exists(dst_client, dst.repository, desc.digest):
            report.skipped.append(desc.digest)
            reporter().skip(desc.size)
            continue
        upload = _Upload(src_client, src.repository, dst_client, dst.repository, desc, sessions)
        retrying(upload.attempt, ctx.policy)
        report.copied += upload.sent
    media_type = media_type_of(got.raw, got.media_type)
    pushed = push.put_manifest(dst_client, dst.repository, dst.reference, got.raw, media_type)
    if pushed and pushed != got.digest:
        raise DigestMismatchError(f"{destination} stored the manifest as {pushed}, not {got.digest}")
    return report


class _Upload:
    """One blob's upload, resumable from the last chunk the destination acknowledged."""

    def __init__(self, src: BlobSource, src_repo: str, dst: RegistryClient, dst_repo: str,
                 desc: Descriptor, sessions: Path) -> None:
        self.src, self.src_repo, self.dst, self.dst_repo, self.desc = src, src_repo, dst, dst_repo, desc
        self.saved = sessions / f"{digest_hex(desc.digest)}-{hashlib.sha256(f'{dst.host}/{dst_repo}'.encode()).hexdigest()[:16]}"
        self.sent = 0

    def _session(self) -> tuple[str, int]:
        """The saved session and how much it holds, or a new one."""
        if self.saved.exists():
            session = self.saved.read_text()
            try:
                held = push.uploaded_bytes(self.dst, session)
            except RegistryError:
                held = None
            if held is not None and held <= self.desc.size:
                return session, held
        session = push.start_upload(self.dst, self.dst_repo)
        atomic_write(self.saved, session.encode())
        return session, 0

    def attempt(self) -> None:
        session, held = self._session()
        try:
            if held < self.desc.size:
                session = self._send(session, held)
            push.finish_upload(self.dst, session, self.desc.digest)
        except RegistryError as exc:
            if exc.status == 400 and "DIGEST_INVALID" in exc.codes:
                self.saved.unlink(missing_ok=True)  # the bytes up there are wrong: start this blob over
                raise DigestMismatchError(f"{exc.message}; the blob is sent again from the start") from None
            raise
        self.saved.unlink(missing_ok=True)

    def _send(self, session: str, offset: int) -> str:
        with self.src.open_blob(self.src_repo, self.desc.digest, offset) as blob:
            if blob.start != offset:  # the source ignored our range: restart with a new session
                session, offset = push.start_upload(self.dst, self.dst_repo), 0
            chunks, size = _Bounded(blob.iter_bytes(), self.desc.size - offset), _chunk_size()
            while not chunks.exhausted:
                # The whole chunk is read before its PATCH starts, so a source that fails
                # fails between PATCHes: a PATCH cut mid-body makes the registry drop the
                # session (distribution answers BLOB_UPLOAD_INVALID from then on).
                body = b"".join(chunks.take(size))
                session = push.append(self.dst, session, body)
                atomic_write(self.saved, session.encode())
                self.sent += len(body)
        return session


class _Bounded:
    """Hands out a byte stream in pieces of at most N bytes, without reading past ``limit``."""

    def __init__(self, chunks: Iterator[bytes], limit: int) -> None:
        self._chunks, self._left, self._carry = chunks, limit, b""
        self.last_taken = 0

    @property
    def exhausted(self) -> bool:
        return self._left <= 0

    def take(self, n: int) -> Iterator[bytes]:
        self.last_taken = 0
        budget = min(n, self._left)
        while budget > 0:
            data = self._carry or next(self._chunks, b"")
            if not data:
                raise RegistryError("source stream ended early", temporary=True)
            piece, self._carry = data[:budget], data[budget:]
            budget -= len(piece)
            self._left -= len(piece)
            self.last_taken += len(piece)
            reporter().advance(len(piece))
            yield piece
            cancel.check()
