"""Safety properties of a pull and a copy over the real protocol: the core steps (no Prefect)
against the session's registry, through the fault proxy.

- a config, NVRAM or disk-layer blob whose bytes differ from its digest is refused, fetched
  again, and never reaches Tart's cache;
- a redirected download that fails at the CDN shows its signed URL nowhere;
- a ``Retry-After`` of N seconds is waited out ("not before N s");
- an interrupted ``copy`` resumes its upload session (counted in bytes sent);
- a pull that cannot fit is refused before anything is fetched or allocated.

Each test here is the one ``scripts/mutations.py`` runs for the safety property it names.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tartflow import copy as copy_module
from tartflow import pull as core
from tartflow.context import PullContext, PullSettings
from tartflow.errors import DigestMismatchError, InsufficientSpaceError, RetriesExhaustedError, TartflowError
from tartflow.fetch import fetch_blob
from tartflow.manifest import Descriptor
from tartflow.progress import LogReporter, set_reporter
from tartflow.registry import push
from tartflow.registry.client import ClientSettings, RegistryClient
from tartflow.registry.errors import redact
from tartflow.registry.retry import RetryPolicy
from tartflow.store import Store
from tartflow.tartcache import TartCache
from tests.checks import assert_same_vm
from tests.support.faultproxy import CDN_PATH, FaultProxy
from tests.support.imagebuilder import BuiltImage
from tests.support.registry import Registry, start_registry

#: A signed URL's query parameters (the fault proxy signs as Azure does: ``sig``, ``se``).
SIGNED = re.compile(r"[?&](sig|se)=")
#: Fast retries for tests that expect several attempts; Retry-After tests use the default policy.
FAST = RetryPolicy(retry_for=30, base=0.01, cap=0.05)


def _context(tmp_path: Path, policy: RetryPolicy = FAST, **settings: object) -> PullContext:
    values: dict[str, object] = {"insecure": True, "check_space": False, **settings}
    built = PullContext.build(PullSettings(tart_home=str(tmp_path / "tart"), store=str(tmp_path / "store"),
                                           **values))  # type: ignore[arg-type]
    return PullContext(built.settings, built.store, built.cache, policy, built.client)


def _pull(ctx: PullContext, reference: str) -> Path:
    """The pull flow's steps in order, without Prefect."""
    resolved = core.resolve(ctx, reference)
    for digest in resolved.blobs:
        fetched = core.fetch(ctx, resolved.reference, resolved.manifest_digest, digest)
        if not fetched.verified:
            core.verify(ctx, resolved.reference, resolved.manifest_digest, digest)
    return Path(core.assemble(ctx, resolved.reference, resolved.manifest_digest))


def _ref(proxy: FaultProxy, image: BuiltImage) -> str:
    return f"{proxy.host}/{image.repository}:{image.tag}"


def _blob_gets(proxy: FaultProxy, digest: str) -> list[int]:
    return [r.status for r in proxy.requests if r.method == "GET" and r.path.split("?")[0].endswith(digest)]


def _layer(image: BuiltImage, kind: str) -> dict[str, object]:
    return next(layer for layer in image.layers if layer["mediaType"].endswith(f".{kind}.v1"))


def _serve_wrong(proxy: FaultProxy, digest: str, size: int, count: int | None) -> None:
    """The blob path answers 200 with ``size`` bytes that are not the blob (same length, so
    only the digest can tell)."""
    proxy.override("GET", rf"/blobs/{re.escape(digest)}$", 200,
                   {"Content-Type": "application/octet-stream", "Content-Length": str(size)}, b"\x5a" * size, count)


def _installed(ctx: PullContext) -> list[Path]:
    return [p for p in ctx.cache.oci_root.rglob("sha256:*") if p.is_dir()] if ctx.cache.oci_root.exists() else []


# -- verification of what the registry sends ----------------------------------------------------

@pytest.mark.parametrize("kind", ["config", "nvram"])
def test_a_small_blob_served_wrong_once_is_fetched_again_and_installed_right(
    tmp_path: Path, proxy: FaultProxy, small_image: BuiltImage, kind: str
) -> None:
    layer = _layer(small_image, kind)
    digest, size = str(layer["digest"]), int(str(layer["size"]))
    _serve_wrong(proxy, digest, size, count=1)
    vm = _pull(_context(tmp_path), _ref(proxy, small_image))
    assert_same_vm(vm, small_image)
    assert _blob_gets(proxy, digest) == [200, 200]  # the wrong answer, then the blob


@pytest.mark.parametrize("kind", ["config", "nvram"])
def test_a_small_blob_served_wrong_every_time_is_refused_and_never_installed(
    tmp_path: Path, proxy: FaultProxy, small_image: BuiltImage, kind: str
) -> None:
    layer = _layer(small_image, kind)
    digest, size = str(layer["digest"]), int(str(layer["size"]))
    _serve_wrong(proxy, digest, size, count=None)
    ctx = _context(tmp_path)
    with pytest.raises(DigestMismatchError, match="failed verification 3 times") as info:
        _pull(ctx, _ref(proxy, small_image))
    assert not info.value.temporary
    assert not ctx.store.has_blob(digest, size) and _installed(ctx) == []
    for blob in (ctx.store.root / "blobs" / "sha256").iterdir():  # what was committed is right
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def _stored_block_offset(registry: Registry, image: BuiltImage, digest: str) -> int:
    """An offset in the middle of a stored (uncompressed) block of the blob: a byte flipped
    there still decodes, to other content, so only the digests can catch it."""
    blob = httpx.get(f"{registry.url}/v2/{image.repository}/blobs/{digest}", follow_redirects=True).content
    i = 0
    while i < len(blob):
        magic = blob[i : i + 4]
        if magic == b"bv4-":
            (size,) = struct.unpack_from("<I", blob, i + 4)
            return i + 8 + size // 2
        if magic == b"bv41":
            i += 12 + struct.unpack_from("<II", blob, i + 4)[1]
        else:
            break
    raise AssertionError("no stored block in the layer")


def test_a_disk_layer_served_wrong_once_is_fetched_again_not_declared_corrupt(
    tmp_path: Path, registry: Registry, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    """Decoded on the way in, a flipped byte shows first as a compressed-digest mismatch (the
    registry may send right bytes next time), not as a corrupt image (permanent)."""
    layer = small_image.disk_layers[0]
    proxy.flip_byte(layer["digest"], _stored_block_offset(registry, small_image, layer["digest"]))
    vm = _pull(_context(tmp_path), _ref(proxy, small_image))
    assert_same_vm(vm, small_image)
    assert _blob_gets(proxy, layer["digest"]) == [200, 200]


def test_a_partial_longer_than_its_blob_is_not_trusted(
    tmp_path: Path, registry: Registry, small_image: BuiltImage
) -> None:
    """Left by another tool or a damaged disk, such a partial can never become the blob: it is
    dropped and the blob fetched whole, not retried against until the retry time runs out."""
    desc = Descriptor.model_validate(_layer(small_image, "config"))
    store = Store(tmp_path)
    store.ingest_dir(desc.digest).mkdir(parents=True)
    (store.ingest_dir(desc.digest) / "data").write_bytes(small_image.config_json + b"trailing")
    client = RegistryClient(registry.host, settings=ClientSettings(insecure=True))
    try:
        result = fetch_blob(store, client, small_image.repository, desc, RetryPolicy(retry_for=3, base=0.01, cap=0.05))
    finally:
        client.close()
    assert Path(result.path).read_bytes() == small_image.config_json and result.fetched == desc.size


# -- no signed URL anywhere ------------------------------------------------------------------------

@pytest.fixture
def said(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Everything the core reports or logs while the test runs."""
    lines: list[str] = []
    previous = set_reporter(LogReporter(interval=0, emit=lines.append))
    caplog.set_level(logging.DEBUG, logger="tartflow")
    try:
        yield lines
    finally:
        set_reporter(previous)
        lines.extend(record.getMessage() for record in caplog.records)


def _error_texts(exc: BaseException | None) -> list[str]:
    texts: list[str] = []
    while exc is not None:
        texts += [str(exc), repr(exc), json.dumps(getattr(exc, "__dict__", {}), default=str)]
        exc = exc.__cause__ or exc.__context__
    return texts


def test_a_redirected_download_failing_at_the_cdn_shows_no_signed_url(
    tmp_path: Path, proxy: FaultProxy, small_image: BuiltImage, said: list[str]
) -> None:
    proxy.cdn_redirects(ttl=60)
    proxy.status_burst(403, 1, path_regex=CDN_PATH)  # the signed URL refused once: retried via the registry
    vm = _pull(_context(tmp_path), _ref(proxy, small_image))
    assert_same_vm(vm, small_image)
    cdn = [r for r in proxy.requests if r.path.startswith("/cdn/")]
    assert cdn and "sig=" in cdn[0].path and cdn[0].status == 403  # really redirected, really signed
    waits = [line for line in said if "retrying in" in line]
    assert waits and "/cdn/" in waits[0]  # the CDN URL is named, so its query could have leaked
    assert not [line for line in said if SIGNED.search(line)]

    proxy.clear_faults()
    proxy.cdn_redirects(ttl=60)
    proxy.status_burst(403, 1000, path_regex=CDN_PATH)
    ctx = _context(tmp_path / "again", RetryPolicy(retry_for=0.5, base=0.01, cap=0.02))
    with pytest.raises(RetriesExhaustedError) as info:
        _pull(ctx, _ref(proxy, small_image))
    texts = _error_texts(info.value)
    assert any("/cdn/" in text for text in texts)
    assert not [text for text in texts if SIGNED.search(text)]


def test_redacted_urls_keep_neither_query_nor_userinfo() -> None:
    url = "https://robot:s3cret@cdn.example.test:8443/blobs/sha256/ab?sig=SIGNATURE&se=2030-01-01"
    assert redact(url) == "https://cdn.example.test:8443/blobs/sha256/ab"
    assert redact(httpx.URL(url)) == "https://cdn.example.test:8443/blobs/sha256/ab"


# -- Retry-After ---------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_waited_out(tmp_path: Path, proxy: FaultProxy, small_image: BuiltImage, form: str) -> None:
    """Without the header the default backoff would wait at most 2 s before the second attempt."""
    layer = _layer(small_image, "config")
    desc = Descriptor.model_validate(layer)
    seconds = 3
    until = int(time.time()) + seconds + 1  # an HTTP-date has whole seconds: at least N from now
    header = str(seconds) if form == "seconds" else email.utils.formatdate(until, usegmt=True)
    proxy.status_burst(429, 1, retry_after=header)
    client = RegistryClient(proxy.host, settings=ClientSettings(insecure=True))
    started = time.monotonic()
    try:
        result = fetch_blob(Store(tmp_path), client, small_image.repository, desc, RetryPolicy(retry_for=60))
    finally:
        client.close()
    assert time.monotonic() - started >= seconds if form == "seconds" else time.time() >= until
    assert Path(result.path).read_bytes() == small_image.config_json
    assert _blob_gets(proxy, desc.digest) == [429, 200]


# -- copy resumes its upload session -----------------------------------------------------------

@pytest.fixture
def lan_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("lan")) as server:
        yield server


def test_an_interrupted_copy_resumes_its_upload_session(
    tmp_path: Path, proxy: FaultProxy, small_image: BuiltImage, lan_registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunk = 256 * 1024
    monkeypatch.setattr(copy_module, "CHUNK", chunk)
    stub_size = int(small_image.manifest["config"]["size"])
    config_size = int(str(_layer(small_image, "config")["size"]))
    layer = small_image.disk_layers[0]
    cut = layer["size"] * 3 // 4
    assert cut > 4 * chunk and cut > max(stub_size, config_size)
    proxy.cut_after(cut, count=3)  # the stub and the config are shorter; the first disk layer is cut
    src, dst = _ref(proxy, small_image), f"{lan_registry.host}/seed/resume:{small_image.tag}"
    first = _context(tmp_path, RetryPolicy(retry_for=0))  # no retry: the copy stops at the cut
    with pytest.raises(TartflowError):
        copy_module.copy_image(first, src, dst)
    proxy.clear_faults()
    proxy.reset_counters()
    report = copy_module.copy_image(_context(tmp_path), src, dst)
    rest = small_image.total_compressed - stub_size - config_size  # the first two made it the first time
    acknowledged = (cut // chunk) * chunk  # PATCHes the destination confirmed before the cut
    assert report.copied <= rest - acknowledged  # the upload went on from the saved session
    assert proxy.blob_bytes_served == report.copied  # and asked the source only for those bytes
    client = RegistryClient(lan_registry.host, settings=ClientSettings(insecure=True))
    try:
        assert all(push.blob_exists(client, "seed/resume", str(d["digest"])) for d in small_image.layers)
    finally:
        client.close()
    head = httpx.head(f"{lan_registry.url}/v2/seed/resume/manifests/{small_image.tag}",
                      headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert head.headers.get("docker-content-digest") == small_image.manifest_digest


# -- space ---------------------------------------------------------------------------------------

def test_a_pull_that_cannot_fit_is_refused_before_anything_is_fetched(
    tmp_path: Path, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    ctx = _context(tmp_path, check_space=True, space_margin=float(1 << 60))
    with pytest.raises(InsufficientSpaceError, match="not enough disk space"):
        core.resolve(ctx, _ref(proxy, small_image))
    assert proxy.blob_bytes_served == 0
    assert not list((ctx.store.root / "staging").iterdir())  # no disk.img allocated either
    assert TartCache(tmp_path / "tart").list() == []
