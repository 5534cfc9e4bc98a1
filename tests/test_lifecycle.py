"""Tart's cache lifecycle (issue 13): collection after linking, Tart's lock waited for out loud,
stacked images refused by name. Real registry, real processes, real file systems."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tartflow import pull as core
from tartflow.errors import ImageFormatError
from tartflow.manifest import parse_manifest
from tartflow.staging import Staging
from tests.checks import assert_pulled, assert_same_vm, vm_dir, wait_for
from tests.support.cli import Tartflow
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage, build_and_push, make_disk, push_blob, push_raw_manifest
from tests.support.registry import Registry

LAYER = 2 * 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _image(registry: Registry, tmp_path: Path, repository: str, tag: str, seed: int, size: int = 6 * LAYER) -> BuiltImage:
    disk = tmp_path / f"{repository.replace('/', '_')}-{tag}.img"
    make_disk(disk, size, seed=seed)
    return build_and_push(registry.url, repository, tag, disk, layer_size=LAYER)


def _entries(repo_dir: Path) -> set[str]:
    return {p.name for p in repo_dir.iterdir()} if repo_dir.is_dir() else set()


# --- collection after linking -------------------------------------------------------------------


def test_nightly_refresh_leaves_only_the_new_image_and_digest_pulls(
    user: Tartflow, registry: Registry, tmp_path: Path
) -> None:
    v1 = _image(registry, tmp_path, "acme/nightly", "latest", seed=31)
    pinned = _image(registry, tmp_path, "acme/pinned", "v1", seed=32)
    by_digest = f"{registry.host}/acme/pinned@{pinned.manifest_digest}"
    for ref in (v1.reference, by_digest):
        result = user.run("pull", "--insecure", ref)
        assert result.returncode == 0, result.stderr
    v2 = _image(registry, tmp_path, "acme/nightly", "latest", seed=33)  # the tag moves overnight
    assert v2.manifest_digest != v1.manifest_digest
    result = user.run("pull", "--insecure", v2.reference)
    assert result.returncode == 0, result.stderr

    nightly = user.oci / registry.host.replace(":", "%3A") / "acme" / "nightly"
    assert _entries(nightly) == {"latest", v2.manifest_digest}
    assert os.readlink(nightly / "latest") == str(nightly / v2.manifest_digest)
    assert_pulled(user, registry.host, v2)
    assert_pulled(user, registry.host, pinned)  # pulled by digest: kept although no tag names it
    listed = user.run("list")
    assert listed.returncode == 0 and v1.manifest_digest[:19] not in listed.stdout


def test_collection_never_follows_links_or_leaves_the_host(tmp_path: Path) -> None:
    """A tag link pointing outside the cache, and a digest directory that is a symbolic link
    to a VM elsewhere: collecting removes the links' bookkeeping only, never their targets."""
    from tartflow.collect import collect_host
    from tartflow.tartcache import TartCache

    cache = TartCache(tmp_path / "tart")
    outside = tmp_path / "precious"
    for name in ("config.json", "disk.img", "nvram.bin"):
        (outside / name).parent.mkdir(parents=True, exist_ok=True)
        (outside / name).write_bytes(b"x")
    repo = cache.host_dir("r.example:5000") / "acme" / "vm"
    repo.mkdir(parents=True)
    (repo / ("sha256:" + "a" * 64)).symlink_to(outside)  # a digest "directory" that is a link
    (repo / "gone").symlink_to(repo / ("sha256:" + "b" * 64))  # a broken tag
    done = collect_host(cache, "r.example:5000")
    assert sorted(outside.iterdir()) and (outside / "disk.img").read_bytes() == b"x"
    assert (repo / ("sha256:" + "a" * 64)).is_symlink()
    assert not (repo / "gone").is_symlink() and done.broken_links == [repo / "gone"]


@pytest.mark.parametrize("collect_at_copy", [0, 1])
def test_collection_while_a_pull_copies_layers_out_of_the_image(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collect_at_copy: int
) -> None:
    """Another process collects the VM a pull is copying layers out of (before its first copy,
    or between two): the pull goes on from the network and ends byte-exact."""
    base = _image(registry, tmp_path, "acme/collected", "old", seed=41)
    disk = tmp_path / "changed.img"
    data = bytearray(base.disk_path.read_bytes())
    data[-1000:] = os.urandom(1000)  # only the last layer differs
    disk.write_bytes(bytes(data))
    new = build_and_push(registry.url, "acme/collected", "new", disk, layer_size=LAYER)
    settings = core.PullSettings(insecure=True, tart_home=str(tmp_path / "tart"))
    _pull_in_process(settings, base.reference)
    old_vm = core.PullContext.build(settings).cache.digest_dir(core.parse_reference(base.reference), base.manifest_digest)

    original, calls = Staging.copy, []

    def copy_while_collected(self: Staging, index: int, source: Path, offset: int) -> bool:
        if len(calls) == collect_at_copy:  # a tart/tartflow process moves the tag and collects
            _collect_in_another_process(settings, base)
            assert not old_vm.exists()
        calls.append(index)
        return original(self, index, source, offset)

    monkeypatch.setattr(Staging, "copy", copy_while_collected)
    path = _pull_in_process(settings, new.reference)
    assert_same_vm(Path(path), new)
    assert len(calls) >= collect_at_copy + 1  # the collection really happened mid-pull


def _pull_in_process(settings: core.PullSettings, reference: str) -> str:
    ctx = core.PullContext.build(settings)
    resolved = core.resolve(ctx, reference)
    for digest in resolved.blobs:
        if not core.fetch(ctx, resolved.reference, resolved.manifest_digest, digest).verified:
            core.verify(ctx, resolved.reference, resolved.manifest_digest, digest)
    return core.assemble(ctx, resolved.reference, resolved.manifest_digest)


def _collect_in_another_process(settings: core.PullSettings, image: BuiltImage) -> None:
    """Drop the tag of ``image`` and collect its host, under Tart's lock, in a real process."""
    script = (
        "import os, sys\n"
        "from tartflow.tartcache import TartCache\n"
        "from tartflow.collect import collect_host\n"
        "from tartflow.reference import parse_reference\n"
        "cache, ref = TartCache(), parse_reference(sys.argv[1])\n"
        "with cache.host_lock(ref.host):\n"
        "    os.unlink(cache.repo_dir(ref) / ref.tag)\n"
        "    print(len(collect_host(cache, ref.host).removed))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, image.reference], capture_output=True, text=True,
                          env={**os.environ, "TART_HOME": str(settings.tart_home)}, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr


# --- Tart's lock, out loud ---------------------------------------------------------------------


@pytest.mark.task_failures(r"InterruptedPull: pull interrupted")
def test_waiting_for_tarts_lock_is_said_and_ctrl_c_ends_it(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    host_dir = user.oci / proxy.host.replace(":", "%3A")
    host_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(300)\n", str(host_dir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
        proc = user.start("pull", "--insecure", ref)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        wait_for(lambda: any("waiting for Tart's lock" in line for line in lines), 120, proc)
        note = next(line for line in lines if "waiting for Tart's lock" in line)
        assert str(host_dir) in note and f"process {holder.pid}" in note, note
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert time.monotonic() - started < 5
        assert proc.returncode == 130, "".join(lines)
        reader.join(timeout=5)
        for pipe in (proc.stdout, proc.stderr):
            assert pipe is not None
            pipe.close()
        assert "Traceback" not in "".join(lines)
        assert not (host_dir / small_image.repository / small_image.manifest_digest).exists()
    finally:
        holder.kill()
        holder.communicate()
    served = proxy.blob_bytes_served
    result = user.run("pull", "--insecure", ref)
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    assert proxy.blob_bytes_served == served  # every byte received before Ctrl+C was kept


# --- stacked images ----------------------------------------------------------------------------

OVERLAY = "application/vnd.cirruslabs.tart.disk.asif.overlay.v1"


def _stacked_manifest(registry: Registry) -> bytes:
    def layer(media_type: str, data: bytes, annotations: dict[str, str]) -> dict[str, object]:
        digest = push_blob(registry.url, "acme/stacked", data)
        return {"mediaType": media_type, "size": len(data), "digest": digest, "annotations": annotations}

    chunk = {"org.cirruslabs.tart.uncompressed-size": "4", "org.cirruslabs.tart.uncompressed-content-digest":
             "sha256:" + "0" * 64}
    stub = b'{"architecture":"arm64","os":"darwin"}'
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": len(stub),
                   "digest": push_blob(registry.url, "acme/stacked", stub)},
        "layers": [
            layer("application/vnd.cirruslabs.tart.config.v1", b"{}", {}),
            layer("application/vnd.cirruslabs.tart.disk.v2", b"base", chunk),
            layer(OVERLAY, b"overlay", {"org.cirruslabs.tart.disk-file-chunk-count": "1"}),
            layer("application/vnd.cirruslabs.tart.nvram.v1", b"nvram", {}),
        ],
        "annotations": {"org.cirruslabs.tart.disk.block-size": "4096"},
    }
    return json.dumps(manifest).encode()


@pytest.mark.task_failures(r"ImageFormatError: this is a stacked Tart image")
def test_stacked_image_is_refused_naming_the_format(user: Tartflow, registry: Registry) -> None:
    raw = _stacked_manifest(registry)
    with pytest.raises(ImageFormatError, match="stacked"):
        parse_manifest(raw, "sha256:" + "1" * 64)
    push_raw_manifest(registry.url, "acme/stacked", "v1", raw, OCI_MANIFEST)
    result = user.run("pull", "--insecure", f"{registry.host}/acme/stacked:v1")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "stacked" in lines[0] and OVERLAY in lines[0] and "cannot pull" in lines[0], lines


def test_list_reuse_collection_and_prune_step_over_entries_without_a_disk(
    user: Tartflow, registry: Registry, small_image: BuiltImage
) -> None:
    """A cached stacked image (config, NVRAM, manifest, no disk.img) sits beside a pulled VM."""
    result = user.run("pull", "--insecure", small_image.reference)
    assert result.returncode == 0, result.stderr
    repo = user.oci / registry.host.replace(":", "%3A") / "acme" / "stacked-cached"
    stacked = repo / ("sha256:" + "5" * 64)
    stacked.mkdir(parents=True)
    (stacked / "config.json").write_bytes(small_image.config_json)
    (stacked / "nvram.bin").write_bytes(small_image.nvram)
    (stacked / "manifest.json").write_bytes(small_image.manifest_bytes)  # lists layers it has no disk for
    (repo / "latest").symlink_to(stacked)
    listed = user.run("list")
    assert listed.returncode == 0 and small_image.manifest_digest[:19] in listed.stdout, listed.stderr
    pruned = user.run("prune", "--older-than", "0s")
    assert pruned.returncode == 0, pruned.stderr
    assert stacked.is_dir() and (repo / "latest").is_symlink()  # stepped over, not an error
    assert not vm_dir(user, registry.host, small_image.repository, small_image.manifest_digest).exists()
    again = user.run("pull", "--insecure", small_image.reference)  # reuse looks at the stacked entry
    assert again.returncode == 0, again.stderr
    assert_pulled(user, registry.host, small_image)
    assert stacked.is_dir()
