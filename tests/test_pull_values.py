"""The values that cross the task boundary, and the core steps driven through a ``PullContext``
a test builds itself (its own store, Tart home and client), without Prefect's engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect.serializers import PickleSerializer
from prefect.utilities.hashing import hash_objects

from tartflow import pull as core
from tartflow.context import PullContext, PullSettings
from tartflow.fetch import FetchResult
from tartflow.reference import Reference
from tartflow.registry.client import ClientSettings, RegistryClient
from tartflow.registry.mirrors import BlobSource
from tartflow.registry.retry import RetryPolicy
from tartflow.store import Store
from tartflow.tartcache import TartCache
from tasks.pull import CACHE_PREFIX, content_key
from tests.checks import assert_same_vm
from tests.support.imagebuilder import BuiltImage
from tests.support.registry import Registry

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def test_task_values_survive_prefects_serialiser_and_hash_as_values() -> None:
    values = [
        PullSettings(insecure=True, mirrors={"ghcr.io": ["http://m:5000"]}, tart_home="/x"),
        core.ResolvedImage("h/a:b", DIGEST_A, False, [DIGEST_A, DIGEST_B], 10, 20, 1),
        FetchResult(DIGEST_A, 10, "", 10, 0, 0.5, verified=True),
    ]
    for value in values:
        again = PickleSerializer().loads(PickleSerializer().dumps(value))
        assert again == value and type(again) is type(value)
        assert hash_objects(value) == hash_objects(dataclasses.replace(value))  # equal values, one hash
    assert hash_objects(values[0]) != hash_objects(dataclasses.replace(values[0], insecure=False))


def test_cache_keys_come_from_inputs_and_touch_no_file(tmp_path: Path) -> None:
    settings = PullSettings(tart_home=str(tmp_path / "tart"))
    key = content_key("fetch-layer", settings, DIGEST_A, DIGEST_B)
    assert key.startswith(f"{CACHE_PREFIX}-fetch-layer-")
    assert list(tmp_path.iterdir()) == []  # no store, no Tart home created
    assert key == content_key("fetch-layer", PullSettings(tart_home=str(tmp_path / "tart")), DIGEST_A, DIGEST_B)
    others = {
        content_key("verify-digest", settings, DIGEST_A, DIGEST_B),
        content_key("fetch-layer", settings, DIGEST_B, DIGEST_B),
        content_key("fetch-layer", settings, DIGEST_A, DIGEST_A),
        content_key("fetch-layer", PullSettings(tart_home=str(tmp_path / "other")), DIGEST_A, DIGEST_B),
        content_key("fetch-layer", dataclasses.replace(settings, store=str(tmp_path / "s")), DIGEST_A, DIGEST_B),
    }
    assert key not in others and len(others) == 5


class _Counting:
    """A real registry client that counts the blobs it was asked for."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.blobs: list[str] = []

    def get_manifest(self, repository: str, reference: str):  # type: ignore[no-untyped-def]
        return self.client.get_manifest(repository, reference)

    def open_blob(self, repository: str, digest: str, offset: int = 0):  # type: ignore[no-untyped-def]
        self.blobs.append(digest)
        return self.client.open_blob(repository, digest, offset)


def test_core_steps_take_a_context_with_a_store_and_client_of_the_tests_own(
    tmp_path: Path, registry: Registry, small_image: BuiltImage
) -> None:
    counting = _Counting(RegistryClient(registry.host, settings=ClientSettings(insecure=True)))

    def client(ref: Reference) -> BlobSource:
        assert ref.host == registry.host
        return counting  # type: ignore[return-value]

    settings = PullSettings(insecure=True, check_space=False)
    ctx = PullContext(settings, Store(tmp_path / "own-store"), TartCache(tmp_path / "own-tart"),
                      RetryPolicy(retry_for=5), client)
    ref = f"{registry.host}/{small_image.repository}:{small_image.tag}"
    resolved = core.resolve(ctx, ref)
    assert resolved.manifest_digest == small_image.manifest_digest and not resolved.installed
    assert len(resolved.blobs) == len({layer["digest"] for layer in small_image.manifest["layers"]})
    outputs = core.outputs(ctx, resolved.manifest_digest)
    assert not any(outputs.fetched(d) or outputs.verified(d) for d in resolved.blobs)
    for digest in resolved.blobs:
        fetched = core.fetch(ctx, resolved.reference, resolved.manifest_digest, digest)
        assert outputs.fetched(digest)
        if not fetched.verified:
            core.verify(ctx, resolved.reference, resolved.manifest_digest, digest)
        assert outputs.verified(digest)
    assert sorted(counting.blobs) == sorted(resolved.blobs)
    path = core.assemble(ctx, resolved.reference, resolved.manifest_digest)
    assert Path(path).parent.parent.parent.parent == tmp_path / "own-tart" / "cache" / "OCIs"
    assert_same_vm(Path(path), small_image)
    assert (tmp_path / "own-store" / "manifests").is_dir()
