"""Retry semantics are fields an error is raised with: exhaustion is its own error, chained;
a cut stream that delivered bytes says so; a disk layer whose compressed digest matched but
which decodes wrong is permanent, while bytes that do not decode before their digest is known
are a mismatch, fetched again. On httpx's MockTransport (corners) and a real decoder."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tartflow import checkpoint
from tartflow.errors import CorruptLayerError, DigestMismatchError, RegistryError, RetriesExhaustedError
from tartflow.fetch import fetch_blob
from tartflow.lz4apple import encode_bytes
from tartflow.manifest import Descriptor, DiskLayer, TartImage
from tartflow.registry.client import RegistryClient
from tartflow.registry.retry import RetryPolicy, retrying
from tartflow.staging import Staging
from tartflow.store import Store

DATA = os.urandom(200_000) + bytes(300_000)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Streamed(httpx.SyncByteStream):
    """A body that streams in 64 KiB pieces and, with ``cut_at``, breaks off there."""

    def __init__(self, data: bytes, cut_at: int | None = None) -> None:
        self._data, self._cut_at = data, cut_at

    def __iter__(self) -> Iterator[bytes]:
        end = len(self._data) if self._cut_at is None else self._cut_at
        for start in range(0, end, 65536):
            yield self._data[start : min(start + 65536, end)]
        if self._cut_at is not None:
            raise httpx.ReadError("connection reset by peer")


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> RegistryClient:
    return RegistryClient("registry.test", transport=httpx.MockTransport(handler))


def _serving(blob: bytes, requests: list[httpx.Request], cut_first_at: int | None = None) -> RegistryClient:
    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        start = int((request.headers.get("range") or "bytes=0-")[6:-1])
        headers = {"Content-Length": str(len(blob) - start)}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(blob) - 1}/{len(blob)}"
        cut = cut_first_at if len(requests) == 1 else None
        return httpx.Response(206 if start else 200, stream=_Streamed(blob[start:], cut), headers=headers)

    return _client(handler)


class _Recording(RetryPolicy):
    """Waits almost nothing and records the backoff attempt number of each wait."""

    def delay(self, attempt: int, retry_after: float | None) -> float:
        self.attempts.append(attempt)  # type: ignore[attr-defined]
        return 0.001


def _recording(**kwargs: float) -> _Recording:
    policy = _Recording(**kwargs)  # type: ignore[arg-type]
    object.__setattr__(policy, "attempts", [])
    return policy


def test_exhaustion_raises_its_own_error_chained_and_leaves_the_cause_untouched() -> None:
    causes: list[RegistryError] = []

    def failing() -> None:
        causes.append(RegistryError("blob x: 503 Service Unavailable", status=503, temporary=True))
        raise causes[-1]

    with pytest.raises(RetriesExhaustedError) as info:
        retrying(failing, RetryPolicy(retry_for=0.2, base=0.01, cap=0.02))
    exc = info.value
    assert exc.message == ("blob x: 503 Service Unavailable (gave up after retrying for "
                           f"{0.2 / 60:g} min; run the same command again to continue)")
    assert exc.temporary and exc.exhausted and exc.__cause__ is causes[-1]
    assert len(causes) > 1 and all(c.message == "blob x: 503 Service Unavailable" and not c.exhausted for c in causes)

    outer: list[int] = []

    def exhausted_inside() -> None:
        outer.append(1)
        raise exc

    with pytest.raises(RetriesExhaustedError):  # an exhausted error is not retried again
        retrying(exhausted_inside, RetryPolicy(retry_for=30))
    assert outer == [1]


def test_prefect_retries_temporary_errors_that_are_not_exhausted() -> None:
    from tasks.pull import is_temporary

    class _State:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def result(self, raise_on_failure: bool) -> BaseException:
            return self.exc

    assert is_temporary(None, None, _State(RegistryError("x", temporary=True)))
    assert not is_temporary(None, None, _State(RegistryError("x", status=404)))
    assert not is_temporary(None, None, _State(RetriesExhaustedError("x")))
    assert not is_temporary(None, None, _State(RegistryError("x", temporary=True, exhausted=True)))
    assert not is_temporary(None, None, _State(ValueError("x")))


def test_a_cut_stream_that_delivered_bytes_resets_the_backoff(tmp_path: Path) -> None:
    blob = os.urandom(300_000)
    desc = Descriptor(mediaType="application/octet-stream", digest=_digest(blob), size=len(blob))
    requests: list[httpx.Request] = []
    policy = _recording(retry_for=30)
    result = fetch_blob(Store(tmp_path), _serving(blob, requests, cut_first_at=131072), "acme/vm", desc, policy)
    assert Path(result.path).read_bytes() == blob
    assert [r.headers.get("range") for r in requests] == [None, "bytes=131072-"]
    assert policy.attempts == [0]  # type: ignore[attr-defined]

    policy = _recording(retry_for=30)  # a cut before any byte counts as a failed attempt
    requests.clear()
    fetch_blob(Store(tmp_path / "again"), _serving(blob, requests, cut_first_at=0), "acme/vm", desc, policy)
    assert policy.attempts == [1]  # type: ignore[attr-defined]


def _image(blob: bytes, decoded: bytes, decoded_digest: str) -> TartImage:
    small = Descriptor(mediaType="application/octet-stream", digest=_digest(b"{}"), size=2)
    layer = Descriptor(mediaType="application/vnd.cirruslabs.tart.disk.v2", digest=_digest(blob), size=len(blob))
    return TartImage(_digest(b"manifest"), small, (DiskLayer(layer, 0, len(decoded), decoded_digest),), small)


def _fetch_into_staging(tmp_path: Path, image: TartImage, blob: bytes, keep: bool, requests: list[httpx.Request]) -> None:
    store = Store(tmp_path)
    staging = Staging(store, image)
    staging.prepare(b"{}")
    with staging.decoding(0) as fill:
        assert fill is not None
        try:
            fetch_blob(store, _serving(blob, requests), "acme/vm", image.disk_layers[0].blob,
                       RetryPolicy(retry_for=30, base=0.001, cap=0.001), fill, keep=lambda: keep)
        finally:
            assert not store.blob_path(image.disk_layers[0].blob.digest).exists()
            assert not staging.layer_done(0)


strategies = pytest.mark.parametrize("keep", [
    True,  # the compressed bytes kept in a partial
    pytest.param(False, marks=pytest.mark.skipif(not checkpoint.possible(), reason="no checkpoints here")),
], ids=["kept-partial", "from-checkpoint"])


@strategies
def test_a_layer_that_decodes_wrong_after_its_digest_matched_is_permanent(tmp_path: Path, keep: bool) -> None:
    blob = encode_bytes(DATA, block_size=65536)
    image = _image(blob, DATA, _digest(b"something else"))
    requests: list[httpx.Request] = []
    with pytest.raises(CorruptLayerError, match="re-push it") as info:
        _fetch_into_staging(tmp_path, image, blob, keep, requests)
    assert not info.value.temporary and len(requests) == 1  # the registry would send the same bytes
    assert isinstance(info.value.__cause__, CorruptLayerError)


@strategies
def test_bytes_that_do_not_decode_before_their_digest_is_known_are_fetched_again(tmp_path: Path, keep: bool) -> None:
    blob = b"not lz4 at all" + os.urandom(100_000)
    image = _image(blob, DATA, _digest(DATA))
    requests: list[httpx.Request] = []
    with pytest.raises(DigestMismatchError, match="failed verification 3 times") as info:
        _fetch_into_staging(tmp_path, image, blob, keep, requests)
    assert not info.value.temporary and not isinstance(info.value, CorruptLayerError)
    assert len(requests) == 3


def test_a_good_layer_is_decoded_and_marked_done(tmp_path: Path) -> None:
    blob = encode_bytes(DATA, block_size=65536)
    image = _image(blob, DATA, _digest(DATA))
    store, requests = Store(tmp_path), list[httpx.Request]()
    staging = Staging(store, image)
    staging.prepare(b"{}")
    with staging.decoding(0) as fill:
        result = fetch_blob(store, _serving(blob, requests), "acme/vm", image.disk_layers[0].blob,
                            RetryPolicy(retry_for=30), fill, keep=lambda: True)
    assert result.verified and Path(result.path).read_bytes() == blob
    assert staging.layer_done(0) and (staging.dir / "disk.img").read_bytes() == DATA


def test_a_layer_is_marked_done_only_once_verified(tmp_path: Path) -> None:
    blob = encode_bytes(DATA, block_size=65536)
    image = _image(blob, DATA, _digest(DATA))
    staging = Staging(Store(tmp_path), image)
    staging.prepare(b"{}")
    with staging.decoding(0) as fill:
        assert fill is not None
        decoder = fill.decoder()
        decoder.feed(blob)
        with pytest.raises(RuntimeError):
            fill.mark_done()  # every byte decoded, but not yet checked against the content digest
        assert not staging.layer_done(0)
        decoder.verify()
        fill.mark_done()
    assert staging.layer_done(0)
