"""The test fixtures themselves: a real registry, and a Tart image in it that tartflow can pull.

If these fail, every pull test after them is meaningless, so they check the fixtures against
the format (TART_FORMAT.md) and the registry behaviour tartflow relies on (exact manifest
bytes, Range requests for resume).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from tartflow.lz4apple import AppleLZ4Decoder
from tests.support.imagebuilder import (
    OCI_CONFIG,
    OCI_MANIFEST,
    TART_CONFIG,
    TART_DISK_V2,
    TART_NVRAM,
    UNCOMPRESSED_DIGEST,
    UNCOMPRESSED_SIZE,
    BuiltImage,
    build_and_push,
    make_disk,
    push_blob,
)
from tests.support.registry import Registry, deep_merge, start_registry


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def block_magics(stream: bytes) -> list[bytes]:
    """The magic of every block of an Apple-framed LZ4 stream, walking the headers."""
    magics, pos = [], 0
    while pos < len(stream):
        magic = stream[pos : pos + 4]
        magics.append(magic)
        if magic == b"bv41":
            pos += 12 + int.from_bytes(stream[pos + 8 : pos + 12], "little")
        elif magic == b"bv4-":
            pos += 8 + int.from_bytes(stream[pos + 4 : pos + 8], "little")
        else:
            pos += 4
    return magics


def get_blob(registry: Registry, repository: str, digest: str, **kw: object) -> httpx.Response:
    url = f"{registry.url}/v2/{repository}/blobs/{digest}"
    return httpx.get(url, follow_redirects=False, **kw)  # type: ignore[arg-type]


def test_registry_serves_the_manifest_byte_for_byte(
    registry: Registry, small_image: BuiltImage
) -> None:
    for reference in (small_image.tag, small_image.manifest_digest):
        response = httpx.get(
            f"{registry.url}/v2/{small_image.repository}/manifests/{reference}",
            headers={"Accept": OCI_MANIFEST},
        )
        assert response.status_code == 200
        assert response.content == small_image.manifest_bytes
        assert response.headers["Content-Type"] == OCI_MANIFEST
        assert response.headers["Docker-Content-Digest"] == small_image.manifest_digest
    assert small_image.manifest_digest == sha256(small_image.manifest_bytes)
    assert small_image.reference == f"{registry.host}/acme/small:v1"


def test_small_image_is_laid_out_like_tart(small_image: BuiltImage) -> None:
    manifest = small_image.manifest
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"]["mediaType"] == OCI_CONFIG
    assert b'"application\\/vnd.oci.image.manifest.v1+json"' in small_image.manifest_bytes
    kinds = [layer["mediaType"] for layer in manifest["layers"]]
    assert kinds == [TART_CONFIG] + [TART_DISK_V2] * 4 + [TART_NVRAM]
    assert manifest["layers"] == small_image.layers
    sizes = [int(layer["annotations"][UNCOMPRESSED_SIZE]) for layer in small_image.disk_layers]
    disk_size = small_image.disk_path.stat().st_size
    assert sizes == [4 << 20] * 3 + [disk_size - (12 << 20)]
    assert manifest["annotations"]["org.cirruslabs.tart.uncompressed-disk-size"] == str(disk_size)
    stub = json.loads(small_image.config_stub)
    assert stub["config"]["Labels"] == {"org.cirruslabs.tart.disk.format": "raw"}
    assert small_image.total_compressed == len(small_image.config_stub) + sum(
        layer["size"] for layer in small_image.layers
    )


def test_config_and_nvram_blobs_are_the_files(registry: Registry, small_image: BuiltImage) -> None:
    config_layer, nvram_layer = small_image.layers[0], small_image.layers[-1]
    config = get_blob(registry, small_image.repository, config_layer["digest"])
    assert config.status_code == 200
    assert config.content == small_image.config_json
    assert json.loads(config.content)["os"] == "darwin"
    nvram = get_blob(registry, small_image.repository, nvram_layer["digest"])
    assert nvram.content == small_image.nvram
    assert len(small_image.nvram) == 64 * 1024


def test_disk_layers_decode_to_the_disk(registry: Registry, small_image: BuiltImage) -> None:
    decoded = bytearray()
    blocks_kinds: set[bytes] = set()
    for layer in small_image.disk_layers:
        response = get_blob(registry, small_image.repository, layer["digest"])
        assert response.status_code == 200  # filesystem storage serves blobs, no redirect
        blob = response.content
        assert (len(blob), sha256(blob)) == (layer["size"], layer["digest"])
        blocks_kinds.update(block_magics(blob))
        decoder = AppleLZ4Decoder(int(layer["annotations"][UNCOMPRESSED_SIZE]))
        chunk = bytearray()
        for start in range(0, len(blob), 777_777):  # fed in odd slices, as a network would
            for piece in decoder.feed(blob[start : start + 777_777]):
                chunk += piece
        decoder.finish()
        assert sha256(bytes(chunk)) == layer["annotations"][UNCOMPRESSED_DIGEST]
        decoded += chunk
    assert bytes(decoded) == small_image.disk_path.read_bytes()
    assert blocks_kinds == {b"bv41", b"bv4-", b"bv4$"}  # compressed and stored blocks both


def test_registry_honours_range_requests(registry: Registry, small_image: BuiltImage) -> None:
    layer = small_image.disk_layers[1]
    blob = get_blob(registry, small_image.repository, layer["digest"]).content
    size = len(blob)
    middle = get_blob(
        registry, small_image.repository, layer["digest"], headers={"Range": "bytes=100-4195"}
    )
    assert middle.status_code == 206
    assert middle.headers["Content-Range"] == f"bytes 100-4195/{size}"
    assert middle.content == blob[100:4196]
    tail = get_blob(
        registry, small_image.repository, layer["digest"], headers={"Range": f"bytes={size - 10}-"}
    )
    assert (tail.status_code, tail.content) == (206, blob[-10:])
    # distribution 2.8 answers a range past the end with 416 but a Content-Length of the whole
    # blob and a 33-byte body, so reading that body is a transport error: read headers only.
    url = f"{registry.url}/v2/{small_image.repository}/blobs/{layer['digest']}"
    with httpx.stream("GET", url, headers={"Range": f"bytes={size}-"}) as past_end:
        assert past_end.status_code == 416
        assert past_end.headers["Content-Range"] == f"bytes */{size}"


def test_chunked_upload_and_existing_blobs(registry: Registry, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    make_disk(disk, 300_000, seed=7, pattern="compressible")
    image = build_and_push(
        registry.url, "acme/chunked", "latest", disk, layer_size=200_000, chunk_size=65_536
    )
    assert len(image.disk_layers) == 2
    for layer in image.layers:
        blob = get_blob(registry, "acme/chunked", layer["digest"]).content
        assert sha256(blob) == layer["digest"]
    assert image.disk_layers[0]["size"] < 100_000  # text compresses
    assert push_blob(registry.url, "acme/chunked", b"hello") == sha256(b"hello")
    assert push_blob(registry.url, "acme/chunked", b"hello") == sha256(b"hello")


def test_make_disk_is_deterministic_and_mixed(tmp_path: Path) -> None:
    paths = [tmp_path / name for name in ("a", "b", "c")]
    for path, seed in zip(paths, (3, 3, 4), strict=True):
        make_disk(path, 3_000_001, seed=seed)
    a, b, c = (path.read_bytes() for path in paths)
    assert len(a) == 3_000_001 and a == b and a != c
    assert b"\0" * 65536 in a  # zero regions
    assert a.count(b"host ") > 100  # text regions


def test_extra_config_is_merged(tmp_path: Path) -> None:
    extra = {"http": {"headers": {"X-Tartflow-Test": ["yes"]}}}
    with start_registry(tmp_path, extra_config=extra) as server:
        response = httpx.get(f"{server.url}/v2/")
        assert response.status_code == 200
        assert response.headers["X-Tartflow-Test"] == "yes"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/v2/", timeout=1)
    merged = deep_merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}, "d": None})
    assert merged == {"a": {"b": 5, "c": 2}}
