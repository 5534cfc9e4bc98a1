"""Corners of the blob protocol, on the real wire through the fault proxy's canned answers: a
server that ignores Range. (A length that disagrees with the descriptor is test_hostile's
``test_blob_of_the_wrong_length_is_refused``, on a full pull.)"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tartflow.fetch import fetch_blob
from tartflow.manifest import Descriptor
from tartflow.registry.client import ClientSettings, RegistryClient
from tartflow.registry.retry import RetryPolicy
from tartflow.store import Store
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import push_blob

BLOB = os.urandom(300_000)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
DESC = Descriptor(mediaType="application/octet-stream", digest=DIGEST, size=len(BLOB))


def test_a_200_answer_to_a_range_request_starts_over(tmp_path: Path, proxy: FaultProxy) -> None:
    """A partial of 1000 wrong bytes is resumed with ``Range: bytes=1000-``; the server sends
    the whole blob with 200, and the fetch starts over instead of appending at 1000.

    Mutant it catches: ``RegistryClient._blob_response`` taking a 200 as starting at the
    requested offset (``BlobResponse(offset, ...)``): the blob would be the wrong partial plus
    the whole body, and fail verification every time."""
    assert push_blob(proxy.upstream_url, "acme/vm", BLOB) == DIGEST  # HEADs and auth stay real
    proxy.override("GET", rf"/blobs/{DIGEST}$", 200, {"Content-Type": "application/octet-stream"}, BLOB)
    store = Store(tmp_path)
    store.ingest_dir(DIGEST).mkdir(parents=True)
    (store.ingest_dir(DIGEST) / "data").write_bytes(b"\xff" * 1000)  # a partial that is wrong, too
    client = RegistryClient(proxy.host, settings=ClientSettings(insecure=True))
    try:
        result = fetch_blob(store, client, "acme/vm", DESC, RetryPolicy(retry_for=5))
    finally:
        client.close()
    gets = [r for r in proxy.requests if r.method == "GET" and DIGEST in r.path]
    assert [(r.range_header, r.status, r.bytes_sent) for r in gets] == [("bytes=1000-", 200, len(BLOB))]
    assert Path(result.path).read_bytes() == BLOB and result.fetched == len(BLOB)
