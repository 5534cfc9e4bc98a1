"""``tartflow copy``: seed a second registry, byte for byte, skipping what is there, resuming."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.checks import assert_pulled, fetchable_bytes, wait_for
from tests.support.cli import Tartflow
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage
from tests.support.registry import Registry, start_registry


@pytest.fixture
def lan_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("lan")) as server:
        yield server


def _manifest_digest(registry: Registry, repository: str, tag: str) -> str:
    response = httpx.head(f"{registry.url}/v2/{repository}/manifests/{tag}",
                          headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    return response.headers.get("docker-content-digest", "")


def test_copy_seeds_a_registry_then_skips_what_it_has(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, lan_registry: Registry
) -> None:
    src = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    dst = f"{lan_registry.host}/seed/macos:{small_image.tag}"
    result = user.run("copy", "--insecure", src, dst)
    assert result.returncode == 0, result.stderr
    assert _manifest_digest(lan_registry, "seed/macos", small_image.tag) == small_image.manifest_digest
    assert proxy.blob_bytes_served == small_image.total_compressed  # the OCI config stub too
    pulled = user.run("pull", "--insecure", dst)
    assert pulled.returncode == 0, pulled.stderr
    assert_pulled(user, lan_registry.host, _renamed(small_image, "seed/macos"))
    proxy.reset_counters()
    again = user.run("copy", "--insecure", src, dst)
    assert again.returncode == 0 and proxy.blob_bytes_served == 0, again.stderr


def test_interrupted_copy_resumes_from_the_last_chunk(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, lan_registry: Registry
) -> None:
    src = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    dst = f"{lan_registry.host}/seed/resume:{small_image.tag}"
    chunk = str(256 * 1024)
    proxy.throttle(1_000_000)
    proc = user.start("copy", "--insecure", src, dst, TARTFLOW_COPY_CHUNK=chunk)
    wait_for(lambda: proxy.blob_bytes_served >= fetchable_bytes(small_image) // 2, 60, proc)
    proc.kill()
    proc.communicate(timeout=10)
    first = proxy.blob_bytes_served
    proxy.clear_faults()
    proxy.reset_counters()
    proxy.cut_after(300_000, count=1)  # and a cut stream in the second run, resumed too
    result = user.run("copy", "--insecure", src, dst, TARTFLOW_COPY_CHUNK=chunk)
    assert result.returncode == 0, result.stderr
    assert _manifest_digest(lan_registry, "seed/resume", small_image.tag) == small_image.manifest_digest
    # Copies go one blob at a time: the kill loses at most the chunk in flight of one blob, and
    # the cut at most one chunk more; a resumed blob asks the source for the rest only.
    # (Mutant: Transfer._session ignoring the saved session, so an interrupted blob starts over
    # from 0: a layer of this image is several chunks, so the waste exceeds the allowance.)
    wasted = first + proxy.blob_bytes_served - small_image.total_compressed
    assert wasted <= 3 * int(chunk), wasted
    resumed = [r for r in proxy.requests if r.range_header and "/blobs/" in r.path]
    assert resumed, "no blob was resumed with a Range request"


def _renamed(image: BuiltImage, repository: str) -> BuiltImage:
    from dataclasses import replace

    return replace(image, repository=repository)
