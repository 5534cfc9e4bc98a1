"""Paths of a pull that no other end-to-end test reaches (issue 20), each on the real registry
behind the fault proxy and the real ``tartflow`` command: ``--retry-for`` running out, a store
on another file system than Tart's cache, a broken leftover at the VM's final path, and gc of
what a killed pull leaves (staging VM, checkpoints, blobs)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.checks import assert_pulled, fetchable_bytes, partial, vm_dir, wait_for
from tests.support.cli import Tartflow, command
from tests.support.faultproxy import BLOB_PATH, SERVER_BUSY_BODY, FaultProxy
from tests.support.imagebuilder import OCI_MANIFEST, BuiltImage, push_raw_manifest
from tests.support.registry import Registry


def ref_of(proxy: FaultProxy, image: BuiltImage) -> str:
    return f"{proxy.host}/{image.repository}:{image.tag}"


def _one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("tartflow: error: "), result.stderr
    return last


@pytest.mark.task_failures(r"RetriesExhaustedError: .*503 ServerBusy")
def test_retry_for_runs_out_with_one_line(user: Tartflow, proxy: FaultProxy, small_image: BuiltImage) -> None:
    """Every blob GET answers 503 ServerBusy; with ``--retry-for 3s`` the pull gives up soon
    after 3 s with one line naming the blob and the last error, and exit code 1.

    Mutant it catches: the ``deadline`` check in ``registry/retry.py`` made ``if False``
    (retries never give up: the command outlives the 90 s timeout)."""
    proxy.override("GET", BLOB_PATH, 503, {"Content-Type": "application/xml", "x-ms-error-code": "ServerBusy"},
                   SERVER_BUSY_BODY, None)
    started = time.monotonic()
    result = user.run("pull", "--insecure", "--retry-for", "3s", ref_of(proxy, small_image), timeout=90)
    elapsed = time.monotonic() - started
    last = _one_line_failure(result)
    assert "ServerBusy" in last and "503" in last, last
    assert elapsed < 60, elapsed
    busy = [r for r in proxy.requests if r.status == 503]
    assert len(busy) >= 2  # it did retry before giving up
    assert not vm_dir(user, proxy.host, small_image.repository, small_image.manifest_digest).exists()


@pytest.mark.task_failures(r"StoreError: .*different file systems")
def test_store_on_another_file_system_is_refused(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, tmp_path: Path
) -> None:
    """``TARTFLOW_HOME`` on tmpfs, Tart's cache on the test's disk: installing would need a copy,
    not a rename, so the pull refuses with one line saying what to set, and leaves nothing at
    the final path.

    Mutant it catches: the ``st_dev`` comparison in ``TartCache.install`` removed (the rename
    fails with EXDEV and a raw OSError, or a half-copied VM lands in Tart's cache)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system here (/dev/shm on the same device as the test's tmp dir)")
    with tempfile.TemporaryDirectory(dir=shm) as store:
        env = user.env()
        env["TARTFLOW_HOME"] = store
        result = subprocess.run([*command(), "pull", "--insecure", ref_of(proxy, small_image)], env=env,
                                capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
        last = _one_line_failure(result)
        assert "different file systems" in last and "TARTFLOW_HOME" in last, last
        assert not vm_dir(user, proxy.host, small_image.repository, small_image.manifest_digest).exists()


def test_install_over_a_broken_leftover_directory(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    """A directory at the VM's final path that is not a VM (a crash of another tool mid-copy)
    is replaced, as Tart itself would discard it; the tag then points at the new VM.

    Mutant it catches: ``TartCache.install`` no longer removing a non-VM leftover (the rename
    onto a non-empty directory fails)."""
    target = vm_dir(user, proxy.host, small_image.repository, small_image.manifest_digest)
    target.mkdir(parents=True)
    (target / "disk.img").write_bytes(b"half a disk")
    result = user.run("pull", "--insecure", ref_of(proxy, small_image))
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    assert os.readlink(target.parent / small_image.tag) == str(target)


def test_gc_collects_staging_vms_checkpoints_and_orphan_blobs(
    user: Tartflow, proxy: FaultProxy, medium_image: BuiltImage
) -> None:
    """A pull killed mid-way leaves a staging VM, its checkpoints and committed blobs; a blob no
    staging VM lists lies beside them. ``gc --older-than 0`` frees all of it (the existing gc
    test only sees partial downloads), and the next pull still lands the image.

    Mutants it catches: ``gc.collect`` skipping the staging VM, keeping its ``.state`` (the
    checkpoints), or leaving committed blobs no staging VM lists."""
    proxy.throttle(500_000)
    staging = user.store / "staging" / medium_image.manifest_digest.split(":")[1]
    state = staging.with_name(staging.name + ".state")
    proc = user.start("pull", "--insecure", ref_of(proxy, medium_image))
    wait_for(lambda: any(state.glob("layer-*.checkpoint-*")) and any(user.store.glob("blobs/sha256/*")), 60, proc)
    proc.kill()
    proc.communicate(timeout=10)
    orphan = user.store / "blobs" / "sha256" / ("0" * 64)
    orphan.write_bytes(b"left by an image nobody pulls any more")
    blobs = sorted(user.store.glob("blobs/sha256/*"))
    assert staging.is_dir() and any(state.glob("layer-*.checkpoint-*")) and len(blobs) >= 2
    result = user.run("gc", "--older-than", "0")
    assert result.returncode == 0, result.stderr
    assert not staging.exists() and not state.exists(), result.stdout
    assert not any(p.exists() for p in blobs), result.stdout
    assert "staging VM" in result.stdout and f"blob {'0' * 12}" in result.stdout, result.stdout
    proxy.clear_faults()
    again = user.run("pull", "--insecure", ref_of(proxy, medium_image))
    assert again.returncode == 0, again.stderr
    assert_pulled(user, proxy.host, medium_image)


def test_a_compressed_partial_resumes_on_the_wire(user: Tartflow, proxy: FaultProxy, small_image: BuiltImage) -> None:
    """A disk layer's partial holds its first compressed bytes (an earlier run kept them on
    disk): the pull asks the registry for the rest only, with a Range, then decodes the whole
    layer from the partial plus the rest. Only MockTransport tests reached this before.

    Mutant it catches: ``_Download._rehash`` (the kept-partial strategy) discarding any partial
    instead of only one longer than the blob (no Range; the layer moves again from 0)."""
    layer = small_image.disk_layers[1]
    whole = httpx.get(f"{proxy.upstream_url}/v2/{small_image.repository}/blobs/{layer['digest']}").content
    assert len(whole) == layer["size"]
    kept = layer["size"] // 2
    held = partial(user, layer["digest"])
    held.parent.mkdir(parents=True)
    held.write_bytes(whole[:kept])
    result = user.run("pull", "--insecure", ref_of(proxy, small_image))
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    gets = [r for r in proxy.requests if r.method == "GET" and layer["digest"] in r.path]
    assert [(r.range_header, r.status, r.bytes_sent) for r in gets] == [(f"bytes={kept}-", 206, layer["size"] - kept)]
    assert proxy.blob_bytes_served == fetchable_bytes(small_image) - kept


def _stage_blob(user: Tartflow, proxy: FaultProxy, image: BuiltImage, digest: str) -> Path:
    """Put blob ``digest`` into the store as committed, as a pull that kept it (a layer shared
    with another image being pulled) leaves it: verify-digest then decodes it from there."""
    data = httpx.get(f"{proxy.upstream_url}/v2/{image.repository}/blobs/{digest}").content
    blob = user.store / "blobs" / "sha256" / digest.split(":")[1]
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    return blob


def test_verify_decodes_a_layer_from_the_store(user: Tartflow, proxy: FaultProxy, small_image: BuiltImage) -> None:
    """A disk layer already committed in the store is not fetched: verify-digest decodes it
    from the stored blob (``disk.decode_layer``), the path no other end-to-end test reaches.

    Mutant it catches: ``LayerDecoder.feed`` dropping a chunk (``disk.decode_layer`` skipping
    its first read): the layer's content digest no longer matches and the pull fails."""
    layer = small_image.disk_layers[2]
    _stage_blob(user, proxy, small_image, layer["digest"])
    result = user.run("pull", "--insecure", ref_of(proxy, small_image))
    assert result.returncode == 0, result.stderr
    assert_pulled(user, proxy.host, small_image)
    assert not [r for r in proxy.requests if r.method == "GET" and layer["digest"] in r.path]
    assert proxy.blob_bytes_served == fetchable_bytes(small_image) - layer["size"]


@pytest.mark.task_failures(r"CorruptLayerError: .*corrupt")
def test_verify_refuses_a_stored_layer_that_decodes_wrong(
    user: Tartflow, proxy: FaultProxy, small_image: BuiltImage, registry: Registry
) -> None:
    """The same decode from the store, of an image whose manifest states a wrong content digest
    for that layer: one line saying the image is corrupt, and the stored blob is dropped so
    nothing unverified lingers; nothing lands in Tart's cache.

    Mutant it catches: ``LayerDecoder.finish`` not comparing the content digest (the pull
    installs a VM whose disk does not match its manifest)."""
    manifest = json.loads(small_image.manifest_bytes)
    layer = manifest["layers"][next(i for i, d in enumerate(manifest["layers"])
                                     if d["digest"] == small_image.disk_layers[2]["digest"])]
    layer["annotations"]["org.cirruslabs.tart.uncompressed-content-digest"] = "sha256:" + "e" * 64
    raw = json.dumps(manifest).encode()
    digest = push_raw_manifest(registry.url, small_image.repository, "bad-content", raw, OCI_MANIFEST)
    blob = _stage_blob(user, proxy, small_image, layer["digest"])
    result = user.run("pull", "--insecure", f"{proxy.host}/{small_image.repository}:bad-content")
    last = _one_line_failure(result)
    assert "corrupt" in last, last
    assert not blob.exists()
    assert not vm_dir(user, proxy.host, small_image.repository, digest).exists()
