"""Pushing to a registry: blob uploads that resume, and manifests.

Spec: https://github.com/opencontainers/distribution-spec/blob/main/spec.md#push . A blob goes
up in a streamed PATCH to an upload session; the session URL is kept so that after any failure
the next attempt asks the registry how much it holds (GET on the session: ``Range: 0-<last>``)
and sends only the rest. The registry checks the digest at the final PUT; so do we, as we send.
"""

from __future__ import annotations

from collections.abc import Iterable

from .client import RegistryClient

__all__ = ["append", "blob_exists", "finish_upload", "put_manifest", "start_upload", "uploaded_bytes"]


def blob_exists(client: RegistryClient, repository: str, digest: str) -> bool:
    response = client.call("HEAD", f"/v2/{repository}/blobs/{digest}", what=f"blob {digest[:19]}", expect=(200, 404))
    return response.status_code == 200


def start_upload(client: RegistryClient, repository: str) -> str:
    """A new upload session; returns its absolute URL."""
    response = client.call("POST", f"/v2/{repository}/blobs/uploads/", what=f"upload to {repository}", expect=(202,))
    return str(response.request.url.join(response.headers["location"]))


def uploaded_bytes(client: RegistryClient, session: str) -> int | None:
    """How many bytes the session holds, or None if the registry forgot it (start a new one)."""
    response = client.call("GET", session, what="upload session", expect=(204, 404, 400))
    if response.status_code != 204:
        return None
    last = response.headers.get("range", "0-0").rpartition("-")[2]
    return int(last) + 1 if last.isdigit() and response.headers.get("range") else 0


def append(client: RegistryClient, session: str, body: bytes | Iterable[bytes]) -> str:
    """Send ``body`` onto the session (bytes: with a Content-Length); returns the session URL to use next."""
    response = client.call("PATCH", session, what="blob upload", expect=(202,), content=body,
                           headers={"Content-Type": "application/octet-stream"})
    return str(response.request.url.join(response.headers["location"]))


def finish_upload(client: RegistryClient, session: str, digest: str) -> None:
    separator = "&" if "?" in session else "?"
    client.call("PUT", f"{session}{separator}digest={digest}", what=f"blob {digest[:19]}", expect=(201,))


def put_manifest(client: RegistryClient, repository: str, reference: str, raw: bytes, media_type: str) -> str:
    """Push a manifest byte for byte; returns the digest the registry reports."""
    response = client.call("PUT", f"/v2/{repository}/manifests/{reference}", what=f"manifest {repository}:{reference}",
                           expect=(201,), content=raw, headers={"Content-Type": media_type})
    return response.headers.get("docker-content-digest", "")
