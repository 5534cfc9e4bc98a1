"""Synthetic Tart VM images, pushed to a real registry the way ``tart push`` does.

The manifest, config stub and layer descriptors follow Tart's own structs (Sources/tart/OCI/
Manifest.swift, Layerizer/DiskV2.swift) and its JSON encoder (sorted keys, compact, ``/``
written as ``\\/``), so tartflow is tested against the bytes a real Tart image has. Disks are
files; each layer is compressed into a temporary file, hashed in the same pass, and uploaded
before the next one is read, so an 8 GiB disk never sits in memory. Disk contents come from
:mod:`tests.support.diskdata`, the upload protocol from :mod:`tests.support.registrypush`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mmap
import random
import tempfile
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import httpx

from tartflow import lz4apple
from tests.support.diskdata import make_disk
from tests.support.registrypush import (
    TIMEOUT,
    PushAuth,
    Pusher,
    PushError,
    push_blob,
    push_raw_manifest,
    put_manifest,
    sha256_digest,
)

__all__ = [
    "OCI_CONFIG",
    "OCI_MANIFEST",
    "TART_CONFIG",
    "TART_DISK_V1",
    "TART_DISK_V2",
    "TART_NVRAM",
    "BuiltImage",
    "PushAuth",
    "PushError",
    "build_and_push",
    "default_vm_config",
    "make_disk",
    "push_blob",
    "push_raw_manifest",
    "tart_json",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
TART_CONFIG = "application/vnd.cirruslabs.tart.config.v1"
TART_DISK_V1 = "application/vnd.cirruslabs.tart.disk.v1"
TART_DISK_V2 = "application/vnd.cirruslabs.tart.disk.v2"
TART_NVRAM = "application/vnd.cirruslabs.tart.nvram.v1"
UNCOMPRESSED_SIZE = "org.cirruslabs.tart.uncompressed-size"
UNCOMPRESSED_DIGEST = "org.cirruslabs.tart.uncompressed-content-digest"
UNCOMPRESSED_DISK_SIZE = "org.cirruslabs.tart.uncompressed-disk-size"
UPLOAD_TIME = "org.cirruslabs.tart.upload-time"
DISK_FORMAT_LABEL = "org.cirruslabs.tart.disk.format"


def tart_json(value: Any) -> bytes:
    """JSON as Tart's Swift ``JSONEncoder`` with ``.sortedKeys`` writes it (slashes escaped)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("/", "\\/").encode()


@dataclass
class BuiltImage:
    """What :func:`build_and_push` pushed, for tests to compare a pull against."""

    repository: str
    tag: str
    host: str
    manifest_bytes: bytes = field(repr=False)
    manifest_digest: str
    config_json: bytes = field(repr=False)
    nvram: bytes = field(repr=False)
    disk_path: Path
    layers: list[dict[str, Any]]
    total_compressed: int
    config_stub: bytes = field(default=b"", repr=False)

    @property
    def reference(self) -> str:
        return f"{self.host}/{self.repository}:{self.tag}"

    @property
    def manifest(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.manifest_bytes)
        return parsed

    @property
    def disk_layers(self) -> list[dict[str, Any]]:
        return [layer for layer in self.layers if layer["mediaType"] == TART_DISK_V2]


def default_vm_config(seed: int, *, cpu_count: int = 4, memory_size: int = 8 << 30) -> bytes:
    """A plausible macOS VM ``config.json`` as ``tart`` saves it (Swift ``.prettyPrinted``)."""
    rng = random.Random(seed)
    mac = [0x02 | (rng.randrange(256) & 0xFC)] + [rng.randrange(256) for _ in range(5)]
    config = {
        "version": 1,
        "os": "darwin",
        "arch": "arm64",
        "ecid": _b64(b"bplist00\xd1\x01\x02Tecid\x13" + rng.randbytes(40)),
        "hardwareModel": _b64(
            b"bplist00\xd3\x01\x02\x03\x04\x05\x06_\x10\x19" + rng.randbytes(120)
        ),
        "cpuCountMin": cpu_count,
        "cpuCount": cpu_count,
        "memorySizeMin": memory_size,
        "memorySize": memory_size,
        "macAddress": ":".join(f"{b:02x}" for b in mac),
        "display": {"width": 1920, "height": 1200},
        "sync": "full",
    }
    return json.dumps(config, indent=2, separators=(",", " : ")).replace("/", "\\/").encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _seed_for(repository: str, tag: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{repository}:{tag}".encode()).digest()[:8], "big")


def build_and_push(
    registry_url: str,
    repository: str,
    tag: str,
    disk_path: Path,
    *,
    layer_size: int = 512 * 1024 * 1024,
    block_sizes: Sequence[int] | None = None,
    stored: Callable[[int], bool] | None = None,
    config_json: bytes | None = None,
    nvram: bytes | None = None,
    disk_format: str = "raw",
    upload_time: str | None = None,
    chunk_size: int | None = None,
    auth: PushAuth = None,
) -> BuiltImage:
    """Push ``disk_path`` and friends as a Tart image ``repository:tag``.

    Each ``layer_size`` bytes of the disk (the last may be shorter) become one disk.v2 layer,
    compressed with :func:`tartflow.lz4apple.encode` (``block_sizes`` and ``stored`` are passed
    through). ``config_json`` and ``nvram`` default to values derived from repository and tag.
    ``chunk_size`` switches blob uploads from monolithic to chunked PATCHes of that size;
    ``upload_time`` (ISO-8601) pins the manifest annotation, and so the manifest digest.
    ``auth`` (an ``httpx.Auth`` or a Basic ``(user, password)``) is for registries that need it.
    """
    seed = _seed_for(repository, tag)
    config_json = default_vm_config(seed) if config_json is None else config_json
    nvram = random.Random(seed + 1).randbytes(64 << 10) if nvram is None else nvram
    disk_path = Path(disk_path)
    disk_size = disk_path.stat().st_size
    with httpx.Client(timeout=TIMEOUT, auth=auth) as client:
        pusher = Pusher(client, registry_url, repository, chunk_size)
        layers = [_descriptor(TART_CONFIG, pusher.push_bytes(config_json), len(config_json), {})]
        for offset in range(0, disk_size, layer_size):
            length = min(layer_size, disk_size - offset)
            layers.append(_push_disk_layer(pusher, disk_path, offset, length, block_sizes, stored))
        layers.append(_descriptor(TART_NVRAM, pusher.push_bytes(nvram), len(nvram), {}))
        stub = tart_json(
            {
                "architecture": "arm64",
                "os": "darwin",
                "config": {"Labels": {DISK_FORMAT_LABEL: disk_format}},
            }
        )
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "size": len(stub),
                "digest": pusher.push_bytes(stub),
            },
            "layers": layers,
            "annotations": {
                UNCOMPRESSED_DISK_SIZE: str(disk_size),
                UPLOAD_TIME: upload_time
                or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        }
        manifest_bytes = tart_json(manifest)
        digest = put_manifest(client, registry_url, repository, tag, manifest_bytes, OCI_MANIFEST)
    if digest != sha256_digest(manifest_bytes):
        raise PushError(f"registry says the manifest is {digest}, not {sha256_digest(manifest_bytes)}")
    return BuiltImage(
        repository=repository,
        tag=tag,
        host=httpx.URL(registry_url).netloc.decode(),
        manifest_bytes=manifest_bytes,
        manifest_digest=digest,
        config_json=config_json,
        nvram=nvram,
        disk_path=disk_path,
        layers=layers,
        total_compressed=len(stub) + sum(layer["size"] for layer in layers),
        config_stub=stub,
    )


def _descriptor(
    media_type: str, digest: str, size: int, annotations: dict[str, str]
) -> dict[str, Any]:
    # Tart always writes an annotations object on layers, empty for config and NVRAM.
    return {"mediaType": media_type, "size": size, "digest": digest, "annotations": annotations}


def _push_disk_layer(
    pusher: Pusher,
    disk_path: Path,
    offset: int,
    length: int,
    block_sizes: Sequence[int] | None,
    stored: Callable[[int], bool] | None,
) -> dict[str, Any]:
    """Compress one disk chunk into a temporary file next to the disk, then upload it.

    The disk is memory-mapped, so only the pages of this chunk are touched and nothing is
    copied; the compressed digest is computed in the same pass that writes the temporary file.
    """
    with open(disk_path, "rb") as disk, tempfile.TemporaryFile(dir=disk_path.parent) as tmp:
        with mmap.mmap(disk.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            content_digest, digest, size = _compress_into(
                memoryview(mapped)[offset : offset + length], tmp, block_sizes, stored
            )
        pusher.push_file(tmp, digest, size)
    annotations = {UNCOMPRESSED_SIZE: str(length), UNCOMPRESSED_DIGEST: content_digest}
    return _descriptor(TART_DISK_V2, digest, size, annotations)


def _compress_into(
    chunk: memoryview,
    out: IO[bytes],
    block_sizes: Sequence[int] | None,
    stored: Callable[[int], bool] | None,
) -> tuple[str, str, int]:
    """Write ``chunk`` compressed to ``out``: (uncompressed digest, compressed digest, size).

    Releases every view of the mapping before returning, so the caller can close it.
    """
    with chunk:
        content_digest = "sha256:" + hashlib.sha256(chunk).hexdigest()
        compressed = hashlib.sha256()
        size = 0
        pieces = lz4apple.encode(chunk, block_sizes=block_sizes, stored=stored)
        try:
            for piece in pieces:
                out.write(piece)
                compressed.update(piece)
                size += len(piece)
        finally:
            if isinstance(pieces, Generator):
                pieces.close()  # drops the encoder's views of the mapping
    return content_digest, "sha256:" + compressed.hexdigest(), size
