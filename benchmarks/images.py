"""The benchmark's synthetic Tart images, built once into a registry's storage and reused, and the
machine and tools a report describes."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import MB, BenchError, GiB, MiB, log
from tests.support.imagebuilder import OCI_MANIFEST, build_and_push, make_disk
from tests.support.registry import Registry, RegistryStartError, find_registry_binary

RECIPE = 1
UPLOAD_TIME = "2026-05-01T00:00:00Z"  # pinned: the same recipe always gives the same manifest
TAG = "v1"


@dataclass
class Image:
    """A synthetic Tart image in the benchmark's registry (cached across runs as JSON)."""

    name: str
    repository: str
    tag: str
    disk_size: int
    layer_size: int
    manifest_digest: str
    blobs: list[dict[str, Any]]  # config stub first, then the layers: mediaType, digest, size
    build_seconds: float = 0.0

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.blobs[1:]

    @property
    def all_bytes(self) -> int:
        """What skopeo and curl fetch: the config stub and every layer."""
        return sum(int(b["size"]) for b in self.blobs)

    @property
    def layer_bytes(self) -> int:
        """What tartflow fetches: the layers (Tart's real VM config is a layer, not the stub)."""
        return sum(int(b["size"]) for b in self.layers)

    def disk_layers(self) -> int:
        return sum(1 for b in self.layers if b["mediaType"].endswith(".disk.v2"))


def image_name(disk_gib: float, layer_mib: int) -> str:
    return f"disk{disk_gib:g}g-layer{layer_mib}m-r{RECIPE}".replace(".", "p")


def _has_image(registry: Registry, image: Image) -> bool:
    base = f"{registry.url}/v2/{image.repository}"
    with httpx.Client(timeout=10) as client:
        got = client.get(f"{base}/manifests/{image.tag}", headers={"Accept": OCI_MANIFEST})
        if got.status_code != 200 or got.headers.get("Docker-Content-Digest") != image.manifest_digest:
            return False
        for blob in image.blobs:
            head = client.head(f"{base}/blobs/{blob['digest']}")
            if head.status_code != 200 or int(head.headers.get("Content-Length", -1)) != int(blob["size"]):
                return False
    return True


def ensure_image(registry: Registry, workdir: Path, disk_gib: float, layer_mib: int) -> Image:
    """The image of ``disk_gib`` GiB in ``layer_mib`` MiB layers: cached, or built and pushed now."""
    name = image_name(disk_gib, layer_mib)
    meta = workdir / "images" / f"{name}.json"
    if meta.exists():
        image = Image(**json.loads(meta.read_text()))
        if _has_image(registry, image):
            return image
        log(f"image {name}: the registry no longer holds all of it; building it again")
    disk_size, layer_size = int(disk_gib * GiB), layer_mib * MiB
    free = shutil.disk_usage(workdir).free
    if free < 2.2 * disk_size:
        raise BenchError(f"building {name} needs about {2.2 * disk_size / 1e9:.1f} GB free under {workdir}; "
                         f"{free / 1e9:.1f} GB is")
    scratch = workdir / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    disk = scratch / f"{name}.img"
    log(f"image {name}: writing a {disk_size / GiB:g} GiB disk and pushing it (once; cached in {workdir})")
    started = time.monotonic()
    try:
        make_disk(disk, disk_size, seed=zlib.crc32(name.encode()), pattern="mixed")
        built = build_and_push(registry.url, f"bench/{name}", TAG, disk, layer_size=layer_size,
                               upload_time=UPLOAD_TIME)
    finally:
        disk.unlink(missing_ok=True)
    config = built.manifest["config"]
    blobs = [{k: d[k] for k in ("mediaType", "digest", "size")} for d in [config, *built.layers]]
    image = Image(name, built.repository, built.tag, disk_size, layer_size, built.manifest_digest, blobs,
                  round(time.monotonic() - started, 1))
    tmp = meta.with_suffix(".tmp")
    meta.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(asdict(image), indent=2) + "\n")
    tmp.replace(meta)
    log(f"image {name}: {len(blobs)} blobs, {image.all_bytes / MB:.0f} MB compressed, "
        f"built in {image.build_seconds:.0f} s")
    return image


# --- the environment --------------------------------------------------------------------------


def first_line(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "?"


def machine_lines(source: str) -> list[str]:
    if sys.platform == "darwin":
        cpu = first_line(["sysctl", "-n", "machdep.cpu.brand_string"])
        ram = int(first_line(["sysctl", "-n", "hw.memsize"]) or 0)
    else:
        cpu, ram = "?", 0
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith(("model name", "Model", "cpu model")):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) * 1024
    versions = [
        f"tartflow {importlib.metadata.version('tartflow')} ({source})",
        f"prefect {importlib.metadata.version('prefect')}",
        f"httpx {importlib.metadata.version('httpx')}",
        f"lz4 {importlib.metadata.version('lz4')}",
    ]
    return [
        f"machine:  {cpu}; {os.cpu_count()} cores; {ram / GiB:.1f} GiB RAM; {platform.platform()}",
        f"python:   {platform.python_version()} ({sys.executable})",
        f"software: {'; '.join(versions)}",
        f"tools:    {first_line(['skopeo', '--version'])}; {' '.join(first_line(['curl', '--version']).split()[:2])}; "
        f"{first_line([find_registry_binary(), '--version'])}",
    ]


def check_tools() -> str:
    """The tartflow console script; BenchError naming what to install when a tool is missing."""
    missing = [tool for tool in ("skopeo", "curl") if shutil.which(tool) is None]
    try:
        find_registry_binary()
    except RegistryStartError as exc:
        missing.append(f"docker-registry ({exc})")
    if missing:
        raise BenchError("missing: " + ", ".join(missing) + " (Debian: apt-get install skopeo curl docker-registry)")
    script = Path(sys.executable).with_name("tartflow")
    if not script.exists():
        raise BenchError(f"no tartflow console script beside {sys.executable}: run `pip install -e .` in this venv")
    return str(script)


