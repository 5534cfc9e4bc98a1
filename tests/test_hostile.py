"""Hostile registry content, served through our proxy in front of the real registry: each case
ends in one line naming the problem, a non-zero exit within seconds, no traceback, nothing
written outside tartflow's store and TART_HOME, and no image or tag in Tart's cache."""

from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import Tartflow
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage, push_blob
from tests.support.registry import Registry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DISK = "application/vnd.cirruslabs.tart.disk.v2"


def serve_manifest(proxy: FaultProxy, repository: str, tag: str, manifest: dict[str, Any] | bytes) -> None:
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    proxy.override("GET", rf"^/v2/{repository}/manifests/{tag}$", 200, {"Content-Type": OCI_MANIFEST}, body)


def tampered(image: BuiltImage, change) -> dict[str, Any]:
    manifest = json.loads(image.manifest_bytes)
    change(manifest)
    return manifest


def assert_refused(user: Tartflow, result, expected: str, started: float) -> None:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("tartflow: error: ") and expected in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30
    assert not any(p.name.startswith("sha256:") or p.is_symlink() for p in user.oci.rglob("*"))
    outside = {p.name for p in user.tart_home.parent.iterdir()} - {"tart", "prefect", "fs"}
    assert not outside, f"files written outside TART_HOME: {outside}"


def pull(user: Tartflow, proxy: FaultProxy, repository: str, tag: str):
    return user.run("pull", "--insecure", f"{proxy.host}/{repository}:{tag}")


def bad_digest(m: dict[str, Any]) -> None:
    m["layers"][1]["digest"] = "sha256:../../../../etc/passwd"


def huge_config(m: dict[str, Any]) -> None:
    m["layers"][0]["size"] = 64 * 1024 * 1024


def exabyte_disk(m: dict[str, Any]) -> None:
    m["layers"][1]["annotations"]["org.cirruslabs.tart.uncompressed-size"] = str(10**18)


def container_image(m: dict[str, Any]) -> None:
    for layer in m["layers"]:
        layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"


def legacy_v1(m: dict[str, Any]) -> None:
    m["layers"][1]["mediaType"] = "application/vnd.cirruslabs.tart.disk.v1"


def wrong_content_digest(m: dict[str, Any]) -> None:
    m["layers"][1]["annotations"]["org.cirruslabs.tart.uncompressed-content-digest"] = "sha256:" + "e" * 64


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (bad_digest, "invalid descriptor digest"),
        (huge_config, "larger than any real VM"),
        (exabyte_disk, "refusing before allocating"),
        (container_image, "not a Tart VM image: layers have media types [application/vnd.oci.image.layer.v1.tar+gzip]"),
        (legacy_v1, "re-push it"),
        (wrong_content_digest, "not sha256:eeeeeeeeeeee"),
    ],
    ids=["digest-with-dotdot", "config-over-cap", "exabyte-disk", "container-image", "legacy-disk-v1", "content-digest"],
)
@pytest.mark.task_failures(r"ImageFormatError: ", r"CorruptLayerError: .*as the manifest says")
def test_hostile_manifest_is_refused(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, change, expected: str
) -> None:
    serve_manifest(proxy, small_image.repository, "hostile", tampered(small_image, change))
    started = time.monotonic()
    result = pull(user, proxy, small_image.repository, "hostile")
    assert_refused(user, result, expected, started)


@pytest.mark.task_failures(r"ImageFormatError: manifest .* is larger than the \d+-byte cap")
def test_manifest_over_the_cap_is_refused(user: Tartflow, proxy: FaultProxy, small_image: BuiltImage) -> None:
    serve_manifest(proxy, small_image.repository, "big", b"{" + b" " * (5 * 1024 * 1024) + b"}")
    started = time.monotonic()
    assert_refused(user, pull(user, proxy, small_image.repository, "big"), "cap", started)


@pytest.mark.task_failures(r"DigestMismatchError: .*failed verification 3 times")
@pytest.mark.parametrize("extra", [100, -100], ids=["longer", "shorter"])
def test_blob_of_the_wrong_length_is_refused(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, extra: int
) -> None:
    layer = small_image.disk_layers[0]
    body = b"\0" * (layer["size"] + extra)
    proxy.override("GET", rf"/blobs/{layer['digest']}$", 200, {"Content-Type": "application/octet-stream"}, body)
    started = time.monotonic()
    result = pull(user, proxy, small_image.repository, small_image.tag)
    assert_refused(user, result, "failed verification 3 times", started)


def _apple_lz4_bomb(declared: int) -> bytes:
    """A frame whose first block claims to decode to ``declared`` bytes: a decompression bomb."""
    return b"bv41" + struct.pack("<II", declared, 16) + b"\x00" * 16 + b"bv4$"


@pytest.mark.task_failures(r"DigestMismatchError: .*failed verification 3 times")
def test_decompression_bomb_stops_at_the_declared_size(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, registry: Registry
) -> None:
    bomb = _apple_lz4_bomb(2**31)
    digest = push_blob(registry.url, small_image.repository, bomb)

    def swap(m: dict[str, Any]) -> None:
        m["layers"][1].update(digest=digest, size=len(bomb))

    serve_manifest(proxy, small_image.repository, "bomb", tampered(small_image, swap))
    started = time.monotonic()
    result = pull(user, proxy, small_image.repository, "bomb")
    assert_refused(user, result, "corrupt", started)
    staged = list(user.store.glob("staging/*/disk.img"))
    assert all(p.stat().st_blocks * 512 <= small_image.disk_path.stat().st_size for p in staged)


@pytest.mark.task_failures(r"DigestMismatchError: .*failed verification 3 times")
def test_blob_digest_mismatching_its_bytes_in_the_registry_is_refused(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, tmp_path: Path
) -> None:
    # The registry serves bytes for a digest they do not hash to (a broken mirror, say).
    layer = small_image.disk_layers[0]
    body = hashlib.sha256(b"x").digest() * (layer["size"] // 32 + 1)
    proxy.override("GET", rf"/blobs/{layer['digest']}$", 200, {}, body[: layer["size"]])
    started = time.monotonic()
    assert_refused(user, pull(user, proxy, small_image.repository, small_image.tag), "failed verification", started)
