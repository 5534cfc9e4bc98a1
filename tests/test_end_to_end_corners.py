"""Paths of a pull that no other end-to-end test reaches (issue 20), each on the real registry
behind the fault proxy and the real ``tartflow`` command: ``--retry-for`` running out, a store
on another file system than Tart's cache, a broken leftover at the VM's final path, and gc of
what a killed pull leaves (staging VM, checkpoints, blobs)."""

from __future__ import annotations

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
from tests.support.imagebuilder import BuiltImage


def ref_of(proxy: FaultProxy, image: BuiltImage) -> str:
    return f"{proxy.host}/{image.repository}:{image.tag}"


def _one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("tartflow: error: "), result.stderr
    return last


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
