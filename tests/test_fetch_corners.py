"""Corners of the blob protocol that a real registry cannot be made to produce, on httpx's
MockTransport: a server that ignores Range, and one that claims the wrong length."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tartflow.errors import DigestMismatchError
from tartflow.fetch import fetch_blob
from tartflow.manifest import Descriptor
from tartflow.registry.client import RegistryClient
from tartflow.registry.retry import RetryPolicy
from tartflow.store import Store

BLOB = os.urandom(300_000)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
DESC = Descriptor(mediaType="application/octet-stream", digest=DIGEST, size=len(BLOB))


class _Streamed(httpx.SyncByteStream):
    """A body that streams, as a network response does (httpx reads ``content=`` eagerly)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __iter__(self) -> Iterator[bytes]:
        for start in range(0, len(self._data), 65536):
            yield self._data[start : start + 65536]


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> RegistryClient:
    return RegistryClient("registry.test", transport=httpx.MockTransport(handler))


def test_a_200_answer_to_a_range_request_starts_over(tmp_path: Path) -> None:
    store = Store(tmp_path)
    (store.ingest_dir(DIGEST)).mkdir(parents=True)
    (store.ingest_dir(DIGEST) / "data").write_bytes(b"\xff" * 1000)  # a partial that is wrong, too
    seen: list[str | None] = []

    def ignore_range(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("range"))
        return httpx.Response(200, stream=_Streamed(BLOB), headers={"Content-Length": str(len(BLOB))})

    result = fetch_blob(store, _client(ignore_range), "acme/vm", DESC, RetryPolicy(retry_for=5))
    assert seen == ["bytes=1000-"]  # asked for the rest, got the whole: appended nothing at 1000
    assert Path(result.path).read_bytes() == BLOB and result.fetched == len(BLOB)


def test_a_length_that_disagrees_with_the_descriptor_is_refused(tmp_path: Path) -> None:
    calls = []

    def wrong_length(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, stream=_Streamed(BLOB + b"extra"))

    with pytest.raises(DigestMismatchError, match="failed verification 3 times"):
        fetch_blob(Store(tmp_path), _client(wrong_length), "acme/vm", DESC, RetryPolicy(retry_for=30, base=0.01))
    assert len(calls) == 3
    assert not Store(tmp_path).has_blob(DIGEST, len(BLOB))
