"""The fault proxy does what it promises, against a real docker-registry, seen by plain httpx."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.support.faultproxy import AUTH_FAILED_BODY, SERVER_BUSY_BODY, FaultProxy
from tests.support.registry import Registry, start_registry

MiB = 1024 * 1024
SIZE = 3 * MiB
REPO = "test/repo"


@dataclass(frozen=True)
class Blob:
    data: bytes
    digest: str

    @property
    def path(self) -> str:
        return f"/v2/{REPO}/blobs/{self.digest}"


@dataclass
class Fetched:
    status: int
    headers: httpx.Headers
    body: bytes
    error: httpx.TransportError | None


def push(client: httpx.Client, base: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    started = client.post(f"{base}/v2/{REPO}/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = started.headers["Location"]
    # httpx's params= would replace the upload URL's _state query, so append by hand.
    done = client.put(f"{location}&digest={quote(digest)}", content=data)
    assert done.status_code == 201, done.text
    return digest


def fetch(client: httpx.Client, url: str, **kwargs: object) -> Fetched:
    """GET with the body read as far as the server lets us; a cut is returned, not raised."""
    body, error = bytearray(), None
    with client.stream("GET", url, **kwargs) as response:  # type: ignore[arg-type]
        try:
            for chunk in response.iter_raw():
                body += chunk
        except httpx.TransportError as exc:
            error = exc
    return Fetched(response.status_code, response.headers, bytes(body), error)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def blob(registry: Registry) -> Blob:
    data = os.urandom(SIZE)
    with httpx.Client(timeout=10) as client:
        return Blob(data, push(client, registry.url, data))


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as fp:
        yield fp


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


# -- passthrough -----------------------------------------------------------------------------


def test_passthrough_bytes_and_counters(proxy: FaultProxy, client: httpx.Client, blob: Blob):
    got = fetch(client, proxy.url + blob.path)
    head = client.head(proxy.url + blob.path)

    assert (got.status, got.error, got.body) == (200, None, blob.data)
    assert got.headers["Content-Length"] == str(SIZE)
    assert head.status_code == 200 and head.headers["Content-Length"] == str(SIZE)
    assert proxy.blob_bytes_served == SIZE
    assert proxy.requests == [
        ("GET", blob.path, 200, None, SIZE),
        ("HEAD", blob.path, 200, None, 0),
    ]
    assert proxy.host == proxy.url.removeprefix("http://")
    proxy.reset_counters()
    assert (proxy.blob_bytes_served, proxy.requests) == (0, [])


def test_range_passthrough_gives_206(proxy: FaultProxy, client: httpx.Client, blob: Blob):
    got = fetch(client, proxy.url + blob.path, headers={"Range": "bytes=100-199"})

    assert (got.status, got.body) == (206, blob.data[100:200])
    assert got.headers["Content-Range"] == f"bytes 100-199/{SIZE}"
    assert got.headers["Content-Length"] == "100"
    assert proxy.blob_bytes_served == 100
    assert proxy.requests[-1].range_header == "bytes=100-199"


def test_push_through_proxy_rewrites_locations(proxy: FaultProxy, client: httpx.Client):
    data = os.urandom(200_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    started = client.post(f"{proxy.url}/v2/{REPO}/blobs/uploads/")
    assert started.headers["Location"].startswith(proxy.url + "/v2/")
    # A chunked request body (no Content-Length) must reach the registry whole.
    patched = client.patch(started.headers["Location"], content=iter([data[:1000], data[1000:]]))
    assert patched.status_code == 202, patched.text
    done = client.put(f"{patched.headers['Location']}&digest={quote(digest)}")
    assert done.status_code == 201, done.text
    assert done.headers["Location"] == f"{proxy.url}/v2/{REPO}/blobs/{digest}"
    assert client.get(done.headers["Location"]).content == data


def test_registry_416_quirk_passes_through(proxy: FaultProxy, client: httpx.Client, blob: Blob):
    # distribution 2.8 answers an unsatisfiable Range with 416 but keeps the blob's
    # Content-Length, sends 33 bytes and hangs up; the proxy passes that on as it is.
    got = fetch(client, proxy.url + blob.path, headers={"Range": f"bytes={SIZE}-"})

    assert got.status == 416
    assert got.headers["Content-Length"] == str(SIZE)
    assert got.body == b"invalid range: failed to overlap\n"
    assert isinstance(got.error, httpx.RemoteProtocolError)
    assert proxy.blob_bytes_served == 0


# -- egress 503 ------------------------------------------------------------------------------


def assert_server_busy(response: httpx.Response) -> None:
    assert response.status_code == 503
    assert response.headers["x-ms-error-code"] == "ServerBusy"
    assert response.content == SERVER_BUSY_BODY
    assert b"Egress is over the account limit." in response.content


def test_egress_threshold_cuts_stream_then_503_burst(
    proxy: FaultProxy, client: httpx.Client, blob: Blob
):
    proxy.egress_503_at([MiB], burst=3)

    cut = fetch(client, proxy.url + blob.path)
    busy = [client.get(proxy.url + blob.path) for _ in range(3)]
    after = fetch(client, proxy.url + blob.path)

    assert (cut.status, cut.body) == (200, blob.data[:MiB])
    assert isinstance(cut.error, httpx.RemoteProtocolError)
    for response in busy:
        assert_server_busy(response)
    assert (after.status, after.error, after.body) == (200, None, blob.data)
    assert proxy.blob_bytes_served == MiB + SIZE


def test_egress_threshold_cuts_every_stream_in_flight(proxy: FaultProxy, blob: Blob):
    proxy.throttle(2 * MiB)
    proxy.egress_503_at([MiB], burst=1)

    def one() -> Fetched:
        with httpx.Client(timeout=5) as c:
            return fetch(c, proxy.url + blob.path)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: one(), range(2)))

    for got in results:
        assert got.status == 200 and got.error is not None
        assert 0 < len(got.body) < MiB and blob.data.startswith(got.body)
    assert sum(len(got.body) for got in results) == MiB == proxy.blob_bytes_served


# -- status bursts ---------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", ["2", formatdate(time.time() + 2, usegmt=True)])
def test_429_with_retry_after(
    proxy: FaultProxy, client: httpx.Client, blob: Blob, retry_after: str
):
    proxy.status_burst(429, 2, retry_after=retry_after)

    limited = [client.get(proxy.url + blob.path) for _ in range(2)]
    after = client.get(proxy.url + blob.path)

    for response in limited:
        assert response.status_code == 429
        assert response.headers["Retry-After"] == retry_after
        assert response.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert after.status_code == 200 and after.content == blob.data


@pytest.mark.parametrize("status", [500, 502, 504])
def test_5xx_burst_only_hits_matching_paths(
    proxy: FaultProxy, client: httpx.Client, blob: Blob, status: int
):
    proxy.status_burst(status, 1, path_regex=r"/manifests/")

    assert client.get(proxy.url + blob.path).status_code == 200
    failed = client.get(f"{proxy.url}/v2/{REPO}/manifests/latest")
    assert failed.status_code == status
    assert failed.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert client.get(f"{proxy.url}/v2/{REPO}/manifests/latest").status_code == 404


# -- broken bodies ---------------------------------------------------------------------------


def test_cut_after_ends_body_early(proxy: FaultProxy, client: httpx.Client, blob: Blob):
    proxy.cut_after(100_000)

    cut = fetch(client, proxy.url + blob.path)
    after = fetch(client, proxy.url + blob.path)

    assert (cut.status, cut.body) == (200, blob.data[:100_000])
    assert cut.headers["Content-Length"] == str(SIZE)
    assert cut.headers["Connection"] == "close"
    assert isinstance(cut.error, httpx.RemoteProtocolError)
    assert (after.error, after.body) == (None, blob.data)
    assert proxy.requests[0].bytes_sent == 100_000


def test_cut_after_with_reset(proxy: FaultProxy, client: httpx.Client, blob: Blob):
    proxy.cut_after(100_000, reset=True)

    cut = fetch(client, proxy.url + blob.path)

    assert cut.error is not None and len(cut.body) <= 100_000
    assert blob.data.startswith(cut.body)
    assert fetch(client, proxy.url + blob.path).body == blob.data


def test_stall_then_close(proxy: FaultProxy, client: httpx.Client, blob: Blob):
    proxy.stall_after(50_000, 0.3)

    started = time.monotonic()
    stalled = fetch(client, proxy.url + blob.path)

    assert time.monotonic() - started >= 0.3
    assert stalled.body == blob.data[:50_000]
    assert isinstance(stalled.error, httpx.RemoteProtocolError)


def test_stall_trips_read_timeout_and_stop_is_prompt(registry: Registry, blob: Blob):
    with (
        FaultProxy(registry.url) as fp,
        httpx.Client(timeout=httpx.Timeout(5, read=0.3)) as impatient,
        httpx.Client(timeout=5) as other,
    ):
        fp.stall_after(50_000, 30)
        stalled = fetch(impatient, fp.url + blob.path)
        assert isinstance(stalled.error, httpx.ReadTimeout)
        assert stalled.body == blob.data[:50_000]
        assert fp.wait_idle(1), "a stall must end once its client hangs up"

        fp.stall_after(10, 30)
        with other.stream("GET", fp.url + blob.path) as response:
            started = time.monotonic()
            fp.stop()
            assert time.monotonic() - started < 1
            with pytest.raises(httpx.TransportError):
                response.read()


@pytest.mark.parametrize(("missing", "expected"), [(None, SIZE // 2), (1, SIZE - 1)])
def test_short_content_length(
    proxy: FaultProxy, client: httpx.Client, blob: Blob, missing: int | None, expected: int
):
    proxy.short_content_length(missing=missing)

    short = fetch(client, proxy.url + blob.path)

    assert short.headers["Content-Length"] == str(SIZE)
    assert short.body == blob.data[:expected]
    assert isinstance(short.error, httpx.RemoteProtocolError)


def test_flip_byte_whole_and_ranged(proxy: FaultProxy, client: httpx.Client, blob: Blob):
    proxy.flip_byte(blob.digest, 1000)
    proxy.flip_byte(blob.digest, 5000)

    flipped = fetch(client, proxy.url + blob.path).body
    ranged = fetch(client, proxy.url + blob.path, headers={"Range": "bytes=4096-8191"}).body
    clean = fetch(client, proxy.url + blob.path).body

    assert hashlib.sha256(flipped).hexdigest() != blob.digest.removeprefix("sha256:")
    assert [i for i in range(SIZE) if flipped[i] != blob.data[i]] == [1000]
    assert flipped[1000] == blob.data[1000] ^ 0xFF
    expected = blob.data[4096:8192]
    assert [i for i in range(4096) if ranged[i] != expected[i]] == [5000 - 4096]
    assert clean == blob.data


# -- CDN redirects ---------------------------------------------------------------------------


def test_cdn_redirect_expires_and_registry_signs_a_fresh_one(
    proxy: FaultProxy, client: httpx.Client, blob: Blob
):
    proxy.cdn_redirects(ttl=0.4)

    redirect = client.get(proxy.url + blob.path)
    cdn_url = redirect.headers["Location"]
    served = fetch(client, cdn_url)
    ranged = fetch(client, cdn_url, headers={"Range": "bytes=10-19"})
    time.sleep(0.5)
    expired = client.get(cdn_url)
    expired_ranged = client.get(cdn_url, headers={"Range": "bytes=10-19"})
    fresh = client.get(proxy.url + blob.path)
    followed = client.get(proxy.url + blob.path, follow_redirects=True)

    assert redirect.status_code == 307 and cdn_url.startswith(f"{proxy.url}/cdn/{blob.digest}?")
    assert (served.status, served.error, served.body) == (200, None, blob.data)
    assert "Docker-Content-Digest" not in served.headers
    assert (ranged.status, ranged.body) == (206, blob.data[10:20])
    for response in (expired, expired_ranged):
        assert response.status_code == 403
        assert response.headers["x-ms-error-code"] == "AuthenticationFailed"
        assert response.content == AUTH_FAILED_BODY
    assert fresh.status_code == 307 and fresh.headers["Location"] != cdn_url
    assert followed.status_code == 200 and followed.content == blob.data
    assert proxy.blob_bytes_served == 2 * SIZE + 10


def test_cdn_path_is_subject_to_faults(proxy: FaultProxy, client: httpx.Client, blob: Blob):
    proxy.cdn_redirects(ttl=30)
    proxy.cut_after(1000)
    proxy.egress_503_at([5000], burst=1)

    cut = fetch(client, proxy.url + blob.path, follow_redirects=True)
    crossed = fetch(client, proxy.url + blob.path, follow_redirects=True)
    busy = client.get(proxy.url + blob.path, follow_redirects=True)
    proxy.flip_byte(blob.digest, 7)
    flipped = client.get(proxy.url + blob.path, follow_redirects=True)

    assert (cut.body, type(cut.error)) == (blob.data[:1000], httpx.RemoteProtocolError)
    assert (crossed.body, type(crossed.error)) == (blob.data[:4000], httpx.RemoteProtocolError)
    assert_server_busy(busy)
    assert busy.url.path.startswith("/cdn/")
    assert flipped.content[7] == blob.data[7] ^ 0xFF
    assert flipped.content[8:] == blob.data[8:]


def test_cdn_rejects_forged_urls_and_passes_registry_errors(
    proxy: FaultProxy, client: httpx.Client, blob: Blob
):
    proxy.cdn_redirects(ttl=30)
    unknown = f"{proxy.url}/v2/{REPO}/blobs/sha256:{'0' * 64}"

    missing = client.get(unknown)
    cdn_url = client.get(proxy.url + blob.path).headers["Location"]
    forged = client.get(cdn_url.replace("se=", "se=9"))

    assert missing.status_code == 404
    assert missing.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert forged.status_code == 403 and forged.content == AUTH_FAILED_BODY


# -- canned answers, robustness ----------------------------------------------------------------


def test_override_serves_canned_answer(proxy: FaultProxy, client: httpx.Client):
    manifest = f"{proxy.url}/v2/{REPO}/manifests/latest"
    body = json.dumps({"schemaVersion": 2, "layers": "hostile"}).encode()
    proxy.override("GET", r"/manifests/latest$", 200, {"Content-Type": "x/hostile"}, body, 1)
    proxy.override("GET", r"/manifests/lying$", 200, {"Content-Length": "100"}, b"short")

    canned = client.get(manifest)
    real = client.get(manifest)
    lying = fetch(client, f"{proxy.url}/v2/{REPO}/manifests/lying")

    assert (canned.status_code, canned.content) == (200, body)
    assert canned.headers["Content-Type"] == "x/hostile"
    assert real.status_code == 404
    assert (lying.body, type(lying.error)) == (b"short", httpx.RemoteProtocolError)


def test_clear_faults(proxy: FaultProxy, client: httpx.Client, blob: Blob):
    proxy.cut_after(10)
    proxy.status_burst(429, 5)
    proxy.cdn_redirects(ttl=30)
    proxy.clear_faults()

    assert fetch(client, proxy.url + blob.path).body == blob.data


def test_client_disconnect_is_quiet(
    proxy: FaultProxy, blob: Blob, capfd: pytest.CaptureFixture[str]
):
    proxy.throttle(2 * MiB)
    with httpx.Client(timeout=5) as c, c.stream("GET", proxy.url + blob.path) as response:
        next(response.iter_raw())
    assert proxy.wait_idle()

    assert proxy.requests[0].status == 200 and 0 < proxy.requests[0].bytes_sent < SIZE
    assert capfd.readouterr().err == ""
    with httpx.Client(timeout=5) as c:
        assert c.head(proxy.url + blob.path).status_code == 200


def test_upstream_down_gives_502(tmp_path: Path):
    with FaultProxy("http://127.0.0.1:9") as fp, httpx.Client(timeout=5) as c:
        response = c.get(fp.url + "/v2/")
    assert response.status_code == 502
    assert response.json()["errors"][0]["code"] == "UNAVAILABLE"


def test_authorization_passes_and_cdn_needs_none(tmp_path: Path):
    # distribution's "silly" auth accepts any Authorization header and challenges without one.
    silly = {"auth": {"silly": {"realm": "http://127.0.0.1/token", "service": "test"}}}
    bearer = {"Authorization": "Bearer anything"}
    data = os.urandom(100_000)
    with (
        start_registry(tmp_path, extra_config=silly) as reg,
        FaultProxy(reg.url) as fp,
        httpx.Client(timeout=5, headers=bearer) as authed,
        httpx.Client(timeout=5) as anonymous,
    ):
        path = f"/v2/{REPO}/blobs/{push(authed, fp.url, data)}"
        fp.cdn_redirects(ttl=30)
        challenged = anonymous.get(fp.url + path)
        redirect = authed.get(fp.url + path)
        served = anonymous.get(redirect.headers["Location"])

    assert challenged.status_code == 401
    assert challenged.headers["WWW-Authenticate"].startswith("Bearer realm=")
    assert redirect.status_code == 307
    assert (served.status_code, served.content) == (200, data)
