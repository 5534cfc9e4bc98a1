"""End to end: ``tartflow pull`` against a real registry, through a byte-counting proxy, on a
real Prefect server; the result compared byte for byte and path for path with what Tart makes."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tartflow import checkpoint
from tests.checks import (
    assert_same_vm,
    done_layers,
    fetchable_bytes,
    partial,
    resident_bytes,
    resumable,
    vm_dir,
    wait_for,
)
from tests.conftest import SMALL_LAYER_SIZE
from tests.support.cli import Tartflow
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage, push_blob, push_raw_manifest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_pull_lands_byte_exact_in_tarts_cache(user: Tartflow, proxy: FaultProxy, small_image: BuiltImage) -> None:
    ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    result = user.run("pull", "--insecure", ref)
    assert result.returncode == 0, result.stderr
    digest_dir = vm_dir(user, proxy.host, small_image.repository, small_image.manifest_digest)
    if sys.platform.startswith("linux"):  # the layers left the page cache once durable (pagecache.py)
        # 10 MB stay without that; the kernel may keep a page or folio it is still busy with.
        assert resident_bytes(digest_dir / "disk.img") < SMALL_LAYER_SIZE
    assert_same_vm(digest_dir, small_image)
    # Exactly Tart's layout: digest directory, absolute tag link, nothing else in the cache.
    host = proxy.host.replace(":", "%3A")
    repo = f"{host}/acme/small"
    assert tree(user.oci) == {
        host, f"{host}/acme", repo, f"{repo}/v1", f"{repo}/{small_image.manifest_digest}",
        *(f"{repo}/{small_image.manifest_digest}/{n}" for n in ("config.json", "disk.img", "nvram.bin", "manifest.json")),
    }
    link = user.oci / repo / "v1"
    assert link.is_symlink() and os.readlink(link) == str(digest_dir)
    assert os.path.isabs(os.readlink(link))
    disk = (digest_dir / "disk.img").stat()
    assert disk.st_blocks * 512 < disk.st_size, "disk.img is not sparse"
    assert proxy.blob_bytes_served == fetchable_bytes(small_image)
    # Nothing left behind in tartflow's store but the manifest and (empty) lock files.
    leftovers = [p for p in user.store.rglob("*") if p.is_file() and not {"manifests", "locks"} & set(p.parts)]
    assert leftovers == []
    # A second pull of a current image moves no blob bytes, and marks the VM used now: Tart's
    # prune goes by access time. (Mutant: TartCache.mark_accessed doing nothing leaves it at 0.
    # Checked before anything here lists the directory, which under relatime would refresh it.)
    os.utime(digest_dir, (0, digest_dir.stat().st_mtime))
    proxy.reset_counters()
    again = user.run("pull", "--insecure", ref)
    assert again.returncode == 0, again.stderr
    assert time.time() - digest_dir.stat().st_atime < 120
    assert proxy.blob_bytes_served == 0
    assert_same_vm(digest_dir, small_image)


def test_pull_by_digest_is_kept_from_tarts_gc(user: Tartflow, proxy: FaultProxy, small_image: BuiltImage) -> None:
    ref = f"{proxy.host}/{small_image.repository}@{small_image.manifest_digest}"
    result = user.run("pull", "--insecure", ref)
    assert result.returncode == 0, result.stderr
    directory = vm_dir(user, proxy.host, small_image.repository, small_image.manifest_digest)
    assert_same_vm(directory, small_image)
    assert (directory / ".explicitly-pulled").read_bytes() == b""
    listing = user.run("list")
    assert listing.returncode == 0
    assert f"{proxy.host}/acme/small@{small_image.manifest_digest}" in listing.stdout


def test_image_index_resolves_to_its_darwin_arm64_manifest(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, registry
) -> None:
    config = b'{"architecture":"amd64","os":"linux"}'
    linux = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": len(config),
                   "digest": push_blob(registry.url, small_image.repository, config)},
    }).encode()
    linux_digest = push_raw_manifest(registry.url, small_image.repository, "linux", linux, OCI_MANIFEST)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": linux_digest,
             "size": len(linux), "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": small_image.manifest_digest,
             "size": len(small_image.manifest_bytes), "platform": {"os": "darwin", "architecture": "arm64"}},
        ],
    }
    push_raw_manifest(registry.url, small_image.repository, "multi", json.dumps(index).encode(), OCI_INDEX)
    result = user.run("pull", "--insecure", f"{proxy.host}/{small_image.repository}:multi")
    assert result.returncode == 0, result.stderr
    directory = vm_dir(user, proxy.host, small_image.repository, small_image.manifest_digest)
    assert_same_vm(directory, small_image)
    assert os.readlink(directory.parent / "multi") == str(directory)


def test_kill_mid_layer_then_resume_asks_only_for_the_rest(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    biggest = max(small_image.disk_layers, key=lambda layer: layer["size"])
    proxy.throttle(2_000_000)
    proc = user.start("pull", "--insecure", ref)
    try:
        wait_for(lambda: resumable(user, small_image, biggest["digest"]) >= biggest["size"] // 2, 60)
        proc.kill()  # kill -9: no chance to clean up or flush anything more
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    kept = resumable(user, small_image, biggest["digest"])
    assert biggest["size"] // 2 <= kept < biggest["size"]
    if checkpoint.possible():  # decoded on the way in: what is kept is a checkpoint, no compressed bytes
        assert not partial(user, biggest["digest"]).exists()
    served_first = proxy.blob_bytes_served
    proxy.clear_faults()
    proxy.reset_counters()
    result = user.run("pull", "--insecure", ref)
    assert result.returncode == 0, result.stderr
    assert_same_vm(vm_dir(user, proxy.host, small_image.repository, small_image.manifest_digest), small_image)
    ranged = [r for r in proxy.requests if biggest["digest"] in r.path]
    assert [r.range_header for r in ranged] == [f"bytes={kept}-"]
    assert sum(r.bytes_sent for r in ranged) == biggest["size"] - kept
    # Together both runs moved the image about once: only bytes in flight at the kill again.
    total = fetchable_bytes(small_image)
    assert served_first + proxy.blob_bytes_served <= total * 1.15


def test_a_checkpoint_over_decoded_bytes_that_were_lost_costs_a_download_not_the_pull(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    """A checkpoint vouches for decoded bytes in disk.img; a resume re-hashes them first. If
    they were damaged meanwhile, the layer starts over: the pull succeeds byte-exact."""
    if not checkpoint.possible():
        pytest.skip("checkpoints are off here: resume uses the compressed partial")
    ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    index, biggest = max(enumerate(small_image.disk_layers), key=lambda pair: pair[1]["size"])
    proxy.throttle(2_000_000)
    proc = user.start("pull", "--insecure", ref)
    try:
        wait_for(lambda: resumable(user, small_image, biggest["digest"]) >= biggest["size"] // 2, 60)
        proc.kill()
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    kept = resumable(user, small_image, biggest["digest"])
    disk = user.store / "staging" / small_image.manifest_digest.split(":")[1] / "disk.img"
    with open(disk, "r+b") as f:  # the start of the layer, well inside what the checkpoint vouches for
        f.seek(index * SMALL_LAYER_SIZE)
        f.write(os.urandom(4096))
    proxy.clear_faults()
    proxy.reset_counters()
    result = user.run("pull", "--insecure", ref)
    assert result.returncode == 0, result.stderr
    assert_same_vm(vm_dir(user, proxy.host, small_image.repository, small_image.manifest_digest), small_image)
    ranged = [r.range_header for r in proxy.requests if biggest["digest"] in r.path]
    assert kept and ranged == [None]  # fetched whole again, not resumed over damaged bytes


def test_a_verified_layer_keeps_only_its_decoded_bytes_and_is_never_fetched_again(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    proxy.throttle(2_000_000)
    proc = user.start("pull", "--insecure", ref, "--concurrency", "1")
    try:
        wait_for(lambda: bool(done_layers(user, small_image)), 60, proc)
        proc.kill()
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    done = done_layers(user, small_image)
    done_digests = {small_image.disk_layers[i]["digest"] for i in done}
    assert done and len(done) < len(small_image.disk_layers)
    for digest in done_digests:  # the compressed bytes were dropped, not committed or left behind
        hexdigest = digest.split(":")[1]
        assert not (user.store / "blobs" / "sha256" / hexdigest).exists()
        assert not partial(user, digest).exists()
    proxy.clear_faults()
    proxy.reset_counters()
    result = user.run("pull", "--insecure", ref)
    assert result.returncode == 0, result.stderr
    assert_same_vm(vm_dir(user, proxy.host, small_image.repository, small_image.manifest_digest), small_image)
    assert not [r.path for r in proxy.requests if any(d in r.path for d in done_digests)]
    assert proxy.blob_bytes_served <= fetchable_bytes(small_image) - sum(
        small_image.disk_layers[i]["size"] for i in done)


@pytest.mark.task_failures(r"InterruptedPull: pull interrupted")
def test_ctrl_c_stops_quickly_keeps_bytes_and_says_how_to_continue(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    first = small_image.disk_layers[0]
    proxy.throttle(1_000_000)
    proc = user.start("pull", "--insecure", ref)
    try:
        wait_for(lambda: resumable(user, small_image, first["digest"]) >= first["size"] // 3, 60)
    except AssertionError:
        proc.kill()
        proc.communicate()
        raise
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 5, "Ctrl+C took longer than 5 s"
    assert proc.returncode == 130, err
    assert "run the same command again" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tartflow: pull interrupted")
    assert resumable(user, small_image, first["digest"]) >= first["size"] // 3


def test_usage_errors_exit_2_with_the_usage_line(user: Tartflow) -> None:
    result = user.run("pull", "not a reference")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: tartflow")
    assert "invalid image reference" in result.stderr and "Traceback" not in result.stderr
    result = user.run("pull", "--concurrency", "0", "127.0.0.1:1/a/b")
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.task_failures(r"RegistryError: manifest .* not found \(404 MANIFEST_UNKNOWN\)")
def test_missing_tag_fails_fast_with_one_line(user: Tartflow, proxy: FaultProxy, small_image: BuiltImage) -> None:
    started = time.monotonic()
    result = user.run("pull", "--insecure", f"{proxy.host}/{small_image.repository}:nope")
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not found" in lines[0] and "Traceback" not in result.stderr
    assert not any(user.oci.rglob("nope"))


def test_ephemeral_server_by_default_without_noise(tmp_path: Path, proxy: FaultProxy, small_image: BuiltImage) -> None:
    """The default a newcomer gets: no Prefect server configured, nothing but tartflow's output."""
    user = Tartflow(tmp_path / "tart", tmp_path / "prefect", api_url=None)
    result = user.run("pull", "--insecure", f"{proxy.host}/{small_image.repository}:{small_image.tag}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("pulled ")
    assert "prefect" not in result.stderr.lower().replace(str(tmp_path).lower(), "")
    assert "warning" not in result.stderr.lower()
