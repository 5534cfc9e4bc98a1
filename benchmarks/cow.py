"""Copy-on-write refresh benchmark (issue 15): ``python -m benchmarks.cow``.

A 4 GiB image in 16 layers (v1), then v2 with one layer changed, both pushed to a local
``docker-registry``. On an XFS file system with reflink (a loop device; needs root, skipped with
the reason otherwise) and on ext4 (also a loop device), it measures:

- a cold pull of v1 (by digest, so it stays), wall time;
- the refresh to v2: wall time, the file system's used-space growth against the changed
  layer's size, the bytes cloned and fetched, and the disk's net new space (FIEMAP);
- on XFS, the same refresh with every cloned layer re-hashed (``TARTFLOW_COW_VERIFY=rehash``):
  the cost of not trusting a verified base;
- on ext4, after one warm-up refresh, the refresh as before this change (cloning switched off)
  and with the new code, alternating twice: the new code takes today's path there, no slower.

Targets: on XFS a refresh takes at most 15 % of a cold pull and grows the file system by at
most the changed bytes plus 10 %. Pulls run the core steps (tartflow.pull) in this process,
fetches four at a time, without Prefect. The machine may be shared: times are one run each and
noisy; the JSON result says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from tartflow import cowbase, pagecache
from tartflow.clone import can_clone
from tartflow.manifest import parse_manifest
from tartflow.pull import PullContext, PullSettings, assemble, fetch, resolve, verify
from tartflow.tartcache import TartCache
from tests.support.imagebuilder import OCI_MANIFEST, build_and_push, make_disk
from tests.support.loopfs import LoopMountRefused, loop_mount, used_bytes
from tests.support.registry import Registry, start_registry

GiB, MiB = 1024**3, 1024**2
REPOSITORY = "bench/cow"


def log(text: str) -> None:
    print(f"[cow {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _manifest_digest(registry: Registry, tag: str) -> str | None:
    with httpx.Client(timeout=10) as client:
        got = client.get(f"{registry.url}/v2/{REPOSITORY}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
        return got.headers.get("Docker-Content-Digest") if got.status_code == 200 else None


def ensure_images(registry: Registry, workdir: Path, disk_size: int, layers: int, changed: int) -> dict[str, str]:
    """v1 and v2 (layer ``changed`` rewritten) in the registry, built once per workdir."""
    meta = workdir / f"images-{disk_size}-{layers}-{changed}.json"
    if meta.exists():
        known: dict[str, str] = json.loads(meta.read_text())
        if all(_manifest_digest(registry, tag) == known[tag] for tag in ("v1", "v2")):
            return known
    layer = disk_size // layers
    disk = workdir / "disk.img"
    digests = {}
    started = time.monotonic()
    make_disk(disk, disk_size, seed=15, pattern="mixed")
    log(f"pushing v1 ({disk_size / GiB:g} GiB, {layers} layers)")
    digests["v1"] = build_and_push(registry.url, REPOSITORY, "v1", disk, layer_size=layer,
                                   upload_time="2026-01-01T00:00:00Z").manifest_digest
    part = workdir / "changed.img"
    make_disk(part, layer, seed=16, pattern="mixed")
    with open(disk, "r+b") as f, open(part, "rb") as new:
        f.seek(changed * layer)
        f.write(new.read())
    part.unlink()
    log("pushing v2 (one layer changed)")
    digests["v2"] = build_and_push(registry.url, REPOSITORY, "v2", disk, layer_size=layer,
                                   upload_time="2026-01-02T00:00:00Z").manifest_digest
    digests["changed_layer_bytes"] = str(layer)
    disk.unlink()
    meta.write_text(json.dumps(digests))
    log(f"images built in {time.monotonic() - started:.0f} s")
    return digests


def pull(home: Path, reference: str) -> dict[str, Any]:
    """One pull through the core steps; fetches and verifies four at a time."""
    settings = PullContext.build(PullSettings(insecure=True, tart_home=str(home), store=str(home / "tartflow"),
                                              space_margin=0))
    started = time.monotonic()
    resolved = resolve(settings, reference)
    with ThreadPoolExecutor(4) as pool:
        fetched = list(pool.map(lambda d: fetch(settings, resolved.reference, resolved.manifest_digest, d),
                                resolved.blobs))
        list(pool.map(lambda d: verify(settings, resolved.reference, resolved.manifest_digest, d), resolved.blobs))
    path = Path(assemble(settings, resolved.reference, resolved.manifest_digest))
    seconds = time.monotonic() - started
    report = cowbase.refresh_report(resolved.cloned, resolved.cloned_blobs, fetched, path / "disk.img")
    return {"seconds": round(seconds, 2), "clone_base": resolved.clone_base, **asdict(report), "path": str(path)}


def forget(home: Path, reference: str, digest: str) -> None:
    """Remove an installed image (tag link and digest directory), to pull it again."""
    host, rest = reference.split("/", 1)
    repo_dir = home / "cache" / "OCIs" / host.replace(":", "%3A") / rest.split(":")[0]
    (repo_dir / rest.split(":")[1]).unlink(missing_ok=True)
    shutil.rmtree(repo_dir / digest)


@contextmanager
def cloning_off() -> Iterator[None]:
    """The code as it was before copy-on-write: no clone is ever attempted."""
    saved = cowbase.start_from_clone
    cowbase.start_from_clone = lambda staging, cache: False  # type: ignore[assignment]
    try:
        yield
    finally:
        cowbase.start_from_clone = saved  # type: ignore[assignment]


@contextmanager
def env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def cold_caches(mount: Path) -> None:
    """Drop from the page cache what the cached VMs and the loop device's backing file hold
    (per file, fadvise: other work on a shared machine keeps its cache), so each refresh reads
    its base from the device rather than from memory."""
    os.sync()
    for path in [*mount.rglob("disk.img"), mount.with_name(mount.name + ".img")]:
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                pagecache.drop(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)


def decision_ms(registry: Registry, home: Path) -> float:
    """What the copy-on-write code adds to a refresh before any byte moves: scanning the cache
    for a base and the clone probe (a new process probes once per directory)."""
    with httpx.Client(timeout=10) as client:
        got = client.get(f"{registry.url}/v2/{REPOSITORY}/manifests/v2", headers={"Accept": OCI_MANIFEST})
    image = parse_manifest(got.content, got.headers["Docker-Content-Digest"])
    scratch = home / "tartflow" / "probe-timing"
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = cowbase.choose_base(TartCache(home), image)
    if base is not None:
        can_clone(base.path, scratch)
    elapsed = (time.perf_counter() - started) * 1000
    scratch.rmdir()
    return round(elapsed, 2)


def measured_refresh(mount: Path, home: Path, reference: str) -> dict[str, Any]:
    cold_caches(mount)
    used = used_bytes(mount)
    run = pull(home, reference)
    run["fs_growth"] = used_bytes(mount) - used
    return run


def on_fs(fstype: str, workdir: Path, registry: Registry, images: dict[str, str], disk_size: int) -> dict[str, Any]:
    host = registry.url.split("://", 1)[1]
    v1 = f"{host}/{REPOSITORY}@{images['v1']}"
    v2 = f"{host}/{REPOSITORY}:v2"
    result: dict[str, Any] = {}
    with loop_mount(workdir / f"{fstype}.img", workdir / fstype, fstype, 3 * disk_size + 2 * GiB) as mount:
        home = mount / "tart"
        cold_caches(mount)
        used = used_bytes(mount)
        result["cold_v1"] = pull(home, v1)
        result["cold_v1"]["fs_growth"] = used_bytes(mount) - used
        log(f"{fstype}: cold pull {result['cold_v1']['seconds']} s")
        result["fallback_decision_ms"] = decision_ms(registry, home)
        log(f"{fstype}: choosing a base and probing for clones takes {result['fallback_decision_ms']:.1f} ms")
        result["refresh_v2"] = measured_refresh(mount, home, v2)
        log(f"{fstype}: refresh {result['refresh_v2']['seconds']} s, grew {result['refresh_v2']['fs_growth'] / MiB:.0f} MiB")
        forget(home, v2, images["v2"])
        if fstype == "xfs":
            with env("TARTFLOW_COW_VERIFY", "rehash"):
                result["refresh_v2_rehash"] = measured_refresh(mount, home, v2)
            log(f"{fstype}: refresh re-hashing cloned layers {result['refresh_v2_rehash']['seconds']} s")
        else:
            # The first refresh above is a warm-up; then the code before and after this change,
            # alternating, so drift on a shared machine hits both alike.
            for key in ("before_cow", "with_cow", "with_cow", "before_cow"):
                with cloning_off() if key == "before_cow" else contextlib.nullcontext():
                    run = measured_refresh(mount, home, v2)
                result.setdefault(f"refresh_v2_{key}", []).append(run)
                log(f"{fstype}: refresh {key.replace('_', ' ')} {run['seconds']} s")
                forget(home, v2, images["v2"])
    return result


def summarise(results: dict[str, Any], changed: int) -> list[str]:
    lines = []
    xfs = results.get("xfs")
    if isinstance(xfs, dict) and "cold_v1" in xfs:
        cold, refresh, rehash = xfs["cold_v1"]["seconds"], xfs["refresh_v2"], xfs["refresh_v2_rehash"]
        ratio, growth = refresh["seconds"] / cold, refresh["fs_growth"]
        lines += [
            f"xfs: cold pull {cold:.1f} s; refresh {refresh['seconds']:.1f} s = {ratio:.1%} of cold "
            f"(target <= 15%: {'met' if ratio <= 0.15 else 'NOT met'})",
            f"xfs: growth {growth / MiB:.0f} MiB for a {changed / MiB:.0f} MiB changed layer = "
            f"{growth / changed:.2f}x (target <= 1.10x: {'met' if growth <= 1.1 * changed else 'NOT met'}); "
            f"cloned {refresh['cloned'] / MiB:.0f} MiB, fetched {refresh['fetched'] / MiB:.0f} MiB, "
            f"net new {(refresh['net_new'] or 0) / MiB:.0f} MiB",
            f"xfs: re-hashing the cloned layers instead of trusting the base: {rehash['seconds']:.1f} s "
            f"({rehash['seconds'] - refresh['seconds']:+.1f} s for {rehash['cloned'] / GiB:.2f} GiB read back)",
        ]
    ext4 = results.get("ext4")
    if isinstance(ext4, dict) and "cold_v1" in ext4:
        before, now = ([r["seconds"] for r in ext4[k]] for k in ("refresh_v2_before_cow", "refresh_v2_with_cow"))
        lines.append(f"ext4: the copy-on-write code adds {ext4['fallback_decision_ms']} ms before falling back "
                     "(base scan + clone probe); the rest of the refresh is the same code as before")
        lines.append(f"ext4: cold pull {ext4['cold_v1']['seconds']:.1f} s; refresh (warm-up {ext4['refresh_v2']['seconds']:.1f} s) "
                     f"before cow {before} s, with cow {now} s; cloned {ext4['refresh_v2']['cloned']} bytes (fallback)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "tartflow-bench-cow")
    parser.add_argument("--disk-gib", type=float, default=4.0)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--changed", type=int, default=7, help="index of the layer v2 changes")
    parser.add_argument("--fs", nargs="+", default=["xfs", "ext4"], choices=["xfs", "ext4"])
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    disk_size = int(args.disk_gib * GiB) // args.layers * args.layers
    results: dict[str, Any] = {"disk_size": disk_size, "layers": args.layers, "cpus": os.cpu_count(),
                               "note": "one run each, on a machine possibly shared with other work: noisy"}
    with start_registry(workdir / "registry") as registry:
        images = ensure_images(registry, workdir, disk_size, args.layers, args.changed)
        for fstype in args.fs:
            try:
                results[fstype] = on_fs(fstype, workdir, registry, images, disk_size)
            except LoopMountRefused as exc:
                results[fstype] = {"skipped": str(exc)}
                log(f"{fstype}: skipped: {exc}")
    changed = disk_size // args.layers
    lines = summarise(results, changed)
    results["summary"] = lines
    (workdir / "cow-results.json").write_text(json.dumps(results, indent=2) + "\n")
    for line in lines:
        print(line)
    print(f"(full results: {workdir / 'cow-results.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
