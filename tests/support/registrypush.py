"""Blob and manifest uploads to a real registry, the way ``tart push`` makes them.

Push protocol: https://github.com/opencontainers/distribution-spec/blob/main/spec.md#push
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from typing import IO

import httpx

__all__ = ["TIMEOUT", "PushAuth", "PushError", "Pusher", "push_blob", "push_raw_manifest", "put_manifest", "sha256_digest"]

#: How pushes authenticate: an httpx.Auth flow, a Basic (user, password) pair, or not at all.
PushAuth = httpx.Auth | tuple[str, str] | None

_PIECE = 4 << 20  # bytes written or uploaded per call
TIMEOUT = httpx.Timeout(120.0, connect=10.0)


class PushError(RuntimeError):
    """The registry refused part of a push; the message has the status and its body."""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Pusher:
    """Blob uploads to one repository: HEAD first, then POST + PUT, or POST + PATCHes + PUT."""

    def __init__(
        self, client: httpx.Client, registry_url: str, repository: str, chunk_size: int | None
    ) -> None:
        self.client = client
        self.base = httpx.URL(registry_url.rstrip("/") + "/")
        self.repository = repository
        self.chunk_size = chunk_size

    def exists(self, digest: str) -> bool:
        response = self.client.head(self.base.join(f"v2/{self.repository}/blobs/{digest}"))
        return response.status_code == 200

    def push_bytes(self, data: bytes) -> str:
        digest = sha256_digest(data)
        with tempfile.SpooledTemporaryFile(max_size=len(data) + 1) as tmp:
            tmp.write(data)
            self.push_file(tmp, digest, len(data))
        return digest

    def push_file(self, file: IO[bytes], digest: str, size: int) -> None:
        """Upload ``size`` bytes of ``file`` (from its start) as blob ``digest``."""
        if self.exists(digest):
            return
        file.seek(0)
        start = self.client.post(self.base.join(f"v2/{self.repository}/blobs/uploads/"))
        location = self._location(start, 202, "start upload")
        if self.chunk_size:
            for offset in range(0, size, self.chunk_size):
                n = min(self.chunk_size, size - offset)
                patched = self.client.patch(
                    location,
                    content=file.read(n),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + n - 1}",
                    },
                )
                location = self._location(patched, 202, f"PATCH at {offset}")
            body: Iterator[bytes] | bytes = b""
            size_header = "0"
        else:
            body, size_header = _read_pieces(file, size), str(size)
        done = self.client.put(
            location.copy_merge_params({"digest": digest}),
            content=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": size_header},
        )
        _check(done, 201, f"finish upload of {digest}")

    def _location(self, response: httpx.Response, status: int, what: str) -> httpx.URL:
        _check(response, status, what)
        return self.base.join(response.headers["Location"])


def _read_pieces(file: IO[bytes], size: int) -> Iterator[bytes]:
    remaining = size
    while remaining:
        piece = file.read(min(_PIECE, remaining))
        if not piece:
            raise PushError(f"temporary file ended {remaining} bytes early")
        remaining -= len(piece)
        yield piece


def _check(response: httpx.Response, status: int, what: str) -> None:
    if response.status_code != status:
        raise PushError(
            f"{what}: {response.request.method} {response.request.url} answered "
            f"{response.status_code}, expected {status}: {response.text[:500]}"
        )


def put_manifest(
    client: httpx.Client,
    registry_url: str,
    repository: str,
    reference: str,
    manifest_bytes: bytes,
    media_type: str,
) -> str:
    url = f"{registry_url.rstrip('/')}/v2/{repository}/manifests/{reference}"
    response = client.put(url, content=manifest_bytes, headers={"Content-Type": media_type})
    _check(response, 201, f"push manifest {repository}:{reference}")
    return response.headers.get("Docker-Content-Digest") or sha256_digest(manifest_bytes)


def push_raw_manifest(
    registry_url: str,
    repository: str,
    reference: str,
    manifest_bytes: bytes,
    media_type: str,
    *,
    auth: PushAuth = None,
) -> str:
    """PUT ``manifest_bytes`` as they are; returns the digest the registry reports."""
    with httpx.Client(timeout=TIMEOUT, auth=auth) as client:
        return put_manifest(
            client, registry_url, repository, reference, manifest_bytes, media_type
        )


def push_blob(registry_url: str, repository: str, data: bytes, *, auth: PushAuth = None) -> str:
    """Upload ``data`` as a blob (unless the registry has it already); returns its digest."""
    with httpx.Client(timeout=TIMEOUT, auth=auth) as client:
        return Pusher(client, registry_url, repository, None).push_bytes(data)
