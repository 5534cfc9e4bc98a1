"""Manifests and the Tart image they describe.

Spec: https://github.com/opencontainers/image-spec/blob/main/manifest.md and image-index.md;
Tart's layout: ../shared/TART_FORMAT.md. Everything the registry sends is untrusted: digests
are validated, sizes capped, and a manifest that is not a Tart VM is refused with the media
types that came and the ones expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ImageFormatError, InvalidReferenceError
from .reference import validate_digest

__all__ = [
    "MANIFEST_ACCEPT",
    "MAX_MANIFEST_SIZE",
    "Descriptor",
    "DiskLayer",
    "TartImage",
    "parse_manifest",
    "pick_from_index",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])

CONFIG_LAYER = "application/vnd.cirruslabs.tart.config.v1"
DISK_V2_LAYER = "application/vnd.cirruslabs.tart.disk.v2"
DISK_V1_LAYER = "application/vnd.cirruslabs.tart.disk.v1"
NVRAM_LAYER = "application/vnd.cirruslabs.tart.nvram.v1"
#: Stacked images (Tart main, unreleased): ASIF overlay groups on top of disk.v2 base chunks.
DISK_ASIF_OVERLAY_LAYER = "application/vnd.cirruslabs.tart.disk.asif.overlay.v1"

UNCOMPRESSED_SIZE = "org.cirruslabs.tart.uncompressed-size"
UNCOMPRESSED_DIGEST = "org.cirruslabs.tart.uncompressed-content-digest"
UNCOMPRESSED_DISK_SIZE = "org.cirruslabs.tart.uncompressed-disk-size"

#: containerd's cap on manifests; a Tart manifest of a 100 GB image is about 40 KiB.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
#: A VM's config.json is a few KiB; NVRAM is 512 KiB or less on real machines.
MAX_CONFIG_SIZE = 4 * 1024 * 1024
MAX_NVRAM_SIZE = 64 * 1024 * 1024
#: No real disk is larger; a declared size beyond it is refused before anything is allocated.
MAX_DISK_SIZE = 64 * 1024**4
MAX_LAYERS = 100_000


class Descriptor(BaseModel):
    """An OCI content descriptor; the digest is validated before anything else uses it."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    media_type: str = Field(alias="mediaType", max_length=255)
    digest: str
    size: int = Field(ge=0, le=MAX_DISK_SIZE)
    annotations: dict[str, str] = Field(default_factory=dict)
    platform: dict[str, Any] | None = None

    @field_validator("digest")
    @classmethod
    def _digest(cls, value: str) -> str:
        try:
            return validate_digest(value, what="descriptor digest")
        except InvalidReferenceError as exc:
            raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class DiskLayer:
    """One disk chunk: its blob, and where its decoded bytes go in ``disk.img``."""

    blob: Descriptor
    offset: int
    uncompressed_size: int
    uncompressed_digest: str


@dataclass(frozen=True)
class TartImage:
    """A validated Tart VM manifest."""

    manifest_digest: str
    config: Descriptor
    disk_layers: tuple[DiskLayer, ...]
    nvram: Descriptor

    @property
    def disk_size(self) -> int:
        return sum(layer.uncompressed_size for layer in self.disk_layers)

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Every blob to fetch, unique by digest, config first (small), then disk, then NVRAM."""
        seen: dict[str, Descriptor] = {}
        for desc in (self.config, *(d.blob for d in self.disk_layers), self.nvram):
            seen.setdefault(desc.digest, desc)
        return tuple(seen.values())

    @property
    def compressed_size(self) -> int:
        return sum(d.size for d in self.blobs)


def _load(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_MANIFEST_SIZE:
        raise ImageFormatError(f"manifest is {len(raw)} bytes, over the {MAX_MANIFEST_SIZE}-byte cap")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageFormatError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ImageFormatError("manifest is not a JSON object")
    return doc


def media_type_of(raw: bytes, content_type: str | None) -> str:
    doc = _load(raw)
    mt = doc.get("mediaType") or (content_type or "").split(";")[0].strip()
    if not mt and "manifests" in doc:
        mt = OCI_INDEX
    return str(mt or OCI_MANIFEST)


def pick_from_index(raw: bytes) -> Descriptor:
    """From an image index, the darwin/arm64 manifest, or the only one there is."""
    doc = _load(raw)
    try:
        entries = [Descriptor.model_validate(m) for m in _list_field(doc, "manifests")]
    except ValidationError as exc:
        raise ImageFormatError(f"image index is malformed: {_first_error(exc)}") from None
    wanted = [
        e for e in entries
        if (e.platform or {}).get("os") == "darwin" and (e.platform or {}).get("architecture") == "arm64"
    ]
    if wanted:
        return wanted[0]
    if len(entries) == 1:
        return entries[0]
    platforms = sorted({f"{(e.platform or {}).get('os')}/{(e.platform or {}).get('architecture')}" for e in entries})
    raise ImageFormatError(
        f"image index has no darwin/arm64 manifest (has: {', '.join(platforms) or 'none'}); not a Tart VM image"
    )


def _list_field(doc: dict[str, Any], name: str) -> list[Any]:
    value = doc.get(name) or []
    if not isinstance(value, list):
        raise ImageFormatError(f"manifest is malformed: {name!r} is not a list")
    return value


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg')}"


def parse_manifest(raw: bytes, manifest_digest: str) -> TartImage:
    """Validate an image manifest as a Tart VM; raise ImageFormatError saying what is wrong."""
    doc = _load(raw)
    try:
        layers = [Descriptor.model_validate(layer) for layer in _list_field(doc, "layers")]
        Descriptor.model_validate(doc.get("config") or {})  # the OCI stub: validated, never fetched
    except ValidationError as exc:
        raise ImageFormatError(f"manifest is malformed: {_first_error(exc)}") from None
    if len(layers) > MAX_LAYERS:
        raise ImageFormatError(f"manifest lists {len(layers)} layers, over the cap of {MAX_LAYERS}")
    kinds = [layer.media_type for layer in layers]
    if DISK_V1_LAYER in kinds:
        raise ImageFormatError(
            "image uses the legacy Tart disk format (tart.disk.v1) that current Tart refuses too; "
            "re-push it with a recent Tart (tart push) and pull again"
        )
    if DISK_ASIF_OVERLAY_LAYER in kinds:
        raise ImageFormatError(
            f"this is a stacked Tart image (layers of {DISK_ASIF_OVERLAY_LAYER}), which tartflow cannot pull yet; "
            "pull it with a Tart that supports stacked images (tart pull)"
        )
    configs = [layer for layer in layers if layer.media_type == CONFIG_LAYER]
    nvrams = [layer for layer in layers if layer.media_type == NVRAM_LAYER]
    disks = [layer for layer in layers if layer.media_type == DISK_V2_LAYER]
    if len(configs) != 1 or len(nvrams) != 1 or not disks or len(layers) != len(disks) + 2:
        came = ", ".join(sorted(set(kinds))) or "no layers"
        raise ImageFormatError(
            f"not a Tart VM image: layers have media types [{came}]; expected one {CONFIG_LAYER}, "
            f"one or more {DISK_V2_LAYER} and one {NVRAM_LAYER}"
        )
    if configs[0].size > MAX_CONFIG_SIZE or nvrams[0].size > MAX_NVRAM_SIZE:
        raise ImageFormatError("VM config or NVRAM layer is larger than any real VM's; refusing it")
    disk_layers, offset = [], 0
    for index, layer in enumerate(disks):
        size, digest = _disk_annotations(layer, index)
        disk_layers.append(DiskLayer(layer, offset, size, digest))
        offset += size
        if offset > MAX_DISK_SIZE:
            raise ImageFormatError(
                f"declared disk size exceeds {MAX_DISK_SIZE // 1024**4} TiB; refusing before allocating anything"
            )
    return TartImage(validate_digest(manifest_digest), configs[0], tuple(disk_layers), nvrams[0])


def _disk_annotations(layer: Descriptor, index: int) -> tuple[int, str]:
    size_text = layer.annotations.get(UNCOMPRESSED_SIZE, "")
    digest = layer.annotations.get(UNCOMPRESSED_DIGEST, "")
    if not size_text.isascii() or not size_text.isdigit() or len(size_text) > 30:
        raise ImageFormatError(f"disk layer {index} has no valid {UNCOMPRESSED_SIZE} annotation")
    if int(size_text) > MAX_DISK_SIZE:
        raise ImageFormatError(
            f"disk layer {index} declares {int(size_text)} bytes, over {MAX_DISK_SIZE // 1024**4} TiB; "
            "refusing before allocating anything"
        )
    try:
        validate_digest(digest, what=f"{UNCOMPRESSED_DIGEST} of disk layer {index}")
    except InvalidReferenceError as exc:
        raise ImageFormatError(str(exc)) from None
    return int(size_text), digest
