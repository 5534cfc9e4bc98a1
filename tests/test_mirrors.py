"""Pull-through mirrors: tried in order for manifests and blobs, a dead or missing one skipped,
digests verified the same way, the image landing under its own name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartflow.pull import PullContext, PullSettings, fetch, resolve
from tests.checks import assert_pulled, fetchable_bytes
from tests.support.cli import Tartflow
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage
from tests.support.registry import Registry, free_port, start_registry


@pytest.fixture(scope="module")
def pull_through(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A real distribution registry in pull-through-cache mode in front of the session registry."""
    with start_registry(tmp_path_factory.mktemp("mirror"), extra_config={"proxy": {"remoteurl": registry.url}}) as mirror:
        yield mirror


@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("empty")) as server:
        yield server


def test_dead_mirror_is_skipped_and_the_pull_through_cache_serves_everything(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, pull_through: Registry
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    mirrors = json.dumps({proxy.host: [dead, pull_through.url]})
    result = user.run("pull", "--insecure", f"{proxy.host}/{small_image.repository}:{small_image.tag}",
                      TARTFLOW_MIRRORS=mirrors)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)  # under the registry's name, not the mirror's
    assert proxy.blob_bytes_served == 0 and not [r for r in proxy.requests if "/manifests/" in r.path]


def test_a_mirror_that_misses_falls_back_to_the_registry(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, empty_registry: Registry
) -> None:
    mirrors = json.dumps({proxy.host: [empty_registry.url]})
    result = user.run("pull", "--insecure", f"{proxy.host}/{small_image.repository}:{small_image.tag}",
                      TARTFLOW_MIRRORS=mirrors)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    assert proxy.blob_bytes_served == fetchable_bytes(small_image)


def test_malformed_mirror_map_is_a_usage_error(user: Tartflow, small_image: BuiltImage) -> None:
    result = user.run("pull", "--insecure", "127.0.0.1:1/acme/small:v1", TARTFLOW_MIRRORS='{"x": ["ftp://m"]}')
    assert result.returncode == 2 and "http:// or https://" in result.stderr


@pytest.mark.parametrize("mirror", ["pull-through", "empty"])
def test_bytes_are_counted_per_source(
    tmp_path: Path, proxy: FaultProxy, small_image: BuiltImage, pull_through: Registry, empty_registry: Registry,
    mirror: str,
) -> None:
    """A fetch says how many of its bytes a mirror sent; the registry sent the rest.
    Mutant caught: MirroredSource not marking a mirror's stream (``mirror`` stays 0)."""
    url = pull_through.url if mirror == "pull-through" else empty_registry.url
    settings = PullSettings(insecure=True, tart_home=str(tmp_path / "tart"), mirrors={proxy.host: [url]})
    ctx = PullContext.build(settings)
    reference = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    resolved = resolve(ctx, reference)
    results = [fetch(ctx, resolved.reference, resolved.manifest_digest, d) for d in resolved.blobs]
    fetched, mirrored = sum(r.fetched for r in results), sum(r.mirror for r in results)
    assert fetched == fetchable_bytes(small_image)
    assert proxy.blob_bytes_served == fetched - mirrored
    assert mirrored == (fetched if mirror == "pull-through" else 0)
