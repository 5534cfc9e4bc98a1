"""Room before a pull and retention (issue 13): auto-prune on a real, size-limited tmpfs, Tart's
``TART_NO_AUTO_PRUNE``, the ``tartflow prune`` command, the eviction order and the space
formula. Real registry, real processes, real file systems."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartflow import checkpoint, prune
from tartflow.manifest import parse_manifest
from tartflow.pull import PullSettings
from tartflow.reference import parse_reference
from tartflow.staging import Staging
from tartflow.store import Store
from tartflow.tartcache import TartCache
from tests.checks import assert_pulled, vm_dir
from tests.support.cli import Tartflow
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage, build_and_push, make_disk
from tests.support.registry import Registry

MiB = 1024 * 1024
DAY = 86400.0


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 22 MiB tmpfs: room for two 8 MiB VMs and not a third."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root to mount a size-limited tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=22m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def three_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> list[BuiltImage]:
    """Three unrelated 8 MiB VMs of incompressible bytes (no layer shared, nothing sparse)."""
    root = tmp_path_factory.mktemp("three")
    images = []
    for n, name in enumerate(("oldest", "recent", "incoming")):
        disk = root / f"{name}.img"
        make_disk(disk, 8 * MiB, seed=70 + n, pattern="random")
        images.append(build_and_push(registry.url, f"acme/room-{name}", "v1", disk, layer_size=2 * MiB))
    return images


def _ref(proxy: FaultProxy, image: BuiltImage) -> str:
    return f"{proxy.host}/{image.repository}:{image.tag}"


@pytest.mark.task_failures(r"InsufficientSpaceError: not enough disk space .*TART_NO_AUTO_PRUNE is set")
def test_auto_prune_evicts_the_least_recently_used_and_the_pull_fits(
    tiny_fs: Path, tmp_path: Path, proxy: FaultProxy, three_images: list[BuiltImage], prefect_server
) -> None:
    oldest, recent, incoming = three_images
    user = Tartflow(tiny_fs / "tart", tmp_path / "prefect", prefect_server.api_url)
    for image in (oldest, recent):
        result = user.run("pull", "--insecure", _ref(proxy, image), TARTFLOW_SPACE_MARGIN="0")
        assert result.returncode == 0, result.stderr
    now = time.time()
    dirs = {image.repository: vm_dir(user, proxy.host, image.repository, image.manifest_digest)
            for image in three_images}
    os.utime(dirs[recent.repository], (now - 1 * DAY, now))
    os.utime(dirs[oldest.repository], (now - 3 * DAY, now))
    assert shutil.disk_usage(tiny_fs).free < 8 * MiB  # the third one cannot fit as things are
    served = proxy.blob_bytes_served

    refused = user.run("pull", "--insecure", _ref(proxy, incoming), TARTFLOW_SPACE_MARGIN="0", TART_NO_AUTO_PRUNE="1")
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "TART_NO_AUTO_PRUNE" in lines[0] and "bytes are free" in lines[0], lines
    assert dirs[oldest.repository].is_dir() and dirs[recent.repository].is_dir()  # nothing evicted
    assert proxy.blob_bytes_served == served  # refused before fetching anything

    result = user.run("pull", "--insecure", _ref(proxy, incoming), TARTFLOW_SPACE_MARGIN="0")
    assert result.returncode == 0, result.stderr
    assert f"evicted {proxy.host}/{oldest.repository}:v1" in result.stderr, result.stderr
    assert not dirs[oldest.repository].exists()
    assert_pulled(user, proxy.host, recent)
    assert_pulled(user, proxy.host, incoming)
    assert not (dirs[oldest.repository].parent / "v1").is_symlink()  # its tag went with it


# --- eviction order and the space formula -------------------------------------------------------


def _fake_vm(cache: TartCache, reference: str, manifest: bytes, digest_char: str, atime: float) -> Path:
    ref = parse_reference(reference)
    vm = cache.digest_dir(ref, "sha256:" + digest_char * 64)
    vm.mkdir(parents=True)
    for name, data in (("config.json", b"{}"), ("nvram.bin", b"n"), ("disk.img", os.urandom(MiB)),
                       ("manifest.json", manifest)):
        (vm / name).write_bytes(data)
    if ref.tag:
        (cache.repo_dir(ref) / ref.tag).symlink_to(vm)
    os.utime(vm, (atime, time.time()))
    return vm


@pytest.mark.parametrize("reuses", [False, True])
def test_the_image_a_tag_leaves_goes_first_unless_its_layers_are_reused(
    tmp_path: Path, small_image: BuiltImage, three_images: list[BuiltImage], reuses: bool
) -> None:
    cache, now = TartCache(tmp_path / "tart"), time.time()
    leaving = _fake_vm(cache, "r.example:5000/acme/app:latest", small_image.manifest_bytes, "a", now)
    older = _fake_vm(cache, "r.example:5000/acme/other:v1", b"{}", "b", now - DAY)
    oldest = _fake_vm(cache, "r.example:5000/acme/third:v1", b"{}", "c", now - 2 * DAY)
    incoming = small_image if reuses else three_images[2]
    image = parse_manifest(incoming.manifest_bytes, incoming.manifest_digest)
    order = [e.path for e in prune._eviction_order(cache, image, parse_reference("r.example:5000/acme/app:latest"))]
    assert order == ([oldest, older, leaving] if reuses else [leaving, oldest, older])


def test_space_asked_is_the_pulls_real_peak(
    tmp_path: Path, small_image: BuiltImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoded disk + blobs kept in the store; a layer decoded on the way in adds nothing while
    checkpoints work, else at most ``concurrency`` layers' compressed bytes are on disk."""
    image = parse_manifest(small_image.manifest_bytes, small_image.manifest_digest)
    store = Store(tmp_path / "store")
    staging = Staging(store, image)
    pending = [d.digest for d in image.blobs]
    kept = image.config.size + image.nvram.size
    layers = sorted((layer.blob.size for layer in image.disk_layers), reverse=True)
    monkeypatch.setattr(checkpoint, "possible", lambda: True)
    assert prune.pull_peak(store, staging, image, pending, 4) == image.disk_size + kept
    monkeypatch.setattr(checkpoint, "possible", lambda: False)
    assert prune.pull_peak(store, staging, image, pending, 2) == image.disk_size + kept + sum(layers[:2])
    assert image.disk_size + kept < image.disk_size + image.compressed_size  # less than the old ask


def test_space_margin_zero_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TARTFLOW_SPACE_MARGIN", "0")
    assert PullSettings.from_env().space_margin == 0


# --- tartflow prune ------------------------------------------------------------------------------


def _prune_user(tmp_path: Path) -> Tartflow:
    return Tartflow(tmp_path / "tart", tmp_path / "prefect", None)


def test_prune_older_than_and_space_budget_as_tart_prune(tmp_path: Path) -> None:
    user = _prune_user(tmp_path)
    cache, now = TartCache(user.tart_home), time.time()
    week_old = _fake_vm(cache, "r.example:5000/acme/week:v1", b"{}", "1", now - 8 * DAY)
    day_old = _fake_vm(cache, "r.example:5000/acme/day:v1", b"{}", "2", now - DAY)
    pinned = _fake_vm(cache, "r.example:5000/acme/pinned@sha256:" + "3" * 64, b"{}", "3", now - 2 * DAY)
    fresh = _fake_vm(cache, "r.example:5000/acme/fresh:v1", b"{}", "4", now)

    assert user.run("prune").returncode == 2
    dry = user.run("prune", "--older-than", "7d", "--dry-run")
    assert dry.returncode == 0 and "would remove r.example:5000/acme/week:v1" in dry.stdout, dry.stdout
    assert week_old.is_dir()
    done = user.run("prune", "--older-than", "7d")
    assert done.returncode == 0, done.stderr
    assert not week_old.exists() and not (week_old.parent / "v1").is_symlink()
    assert day_old.is_dir() and pinned.is_dir() and fresh.is_dir()

    # newest first: fresh and day_old fit 2.5 MB, pinned (older) is the first that does not
    budget = user.run("prune", "--space-budget", "2.5MB")
    assert budget.returncode == 0, budget.stderr
    assert fresh.is_dir() and day_old.is_dir() and not pinned.exists()
    assert f"removed r.example:5000/acme/pinned@sha256:{'3' * 64}" in budget.stdout


def test_prune_keeps_the_images_it_is_told_to_keep(tmp_path: Path) -> None:
    """What prewarm-fleet's prune_older_than passes: the run's images, by tag or by digest."""
    cache, old = TartCache(tmp_path / "tart"), time.time() - 30 * DAY
    tagged = _fake_vm(cache, "r.example:5000/acme/tagged:v1", b"{}", "1", old)
    pinned = _fake_vm(cache, "r.example:5000/acme/pinned@sha256:" + "2" * 64, b"{}", "2", old)
    stale = _fake_vm(cache, "r.example:5000/acme/stale:v1", b"{}", "3", old)
    by_digest = _fake_vm(cache, "r.example:5000/acme/also:v1", b"{}", "4", old)  # tagged, kept by digest
    keep = frozenset({"r.example:5000/acme/tagged:v1", "r.example:5000/acme/pinned@sha256:" + "2" * 64,
                      "r.example:5000/acme/also@sha256:" + "4" * 64})
    report = prune.prune_cache(cache, older_than=DAY, keep=keep)
    assert [e.path for e in report.removed] == [stale]
    assert tagged.is_dir() and pinned.is_dir() and by_digest.is_dir()


def test_prune_leaves_a_host_whose_lock_a_tart_pull_holds(tmp_path: Path) -> None:
    user = _prune_user(tmp_path)
    cache = TartCache(user.tart_home)
    old = _fake_vm(cache, "r.example:5000/acme/old:v1", b"{}", "1", time.time() - 30 * DAY)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(300)\n",
         str(cache.host_dir("r.example:5000"))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = user.run("prune", "--older-than", "1d")
    finally:
        holder.kill()
        holder.communicate()
    assert result.returncode == 0 and "kept r.example:5000/acme/old:v1" in result.stdout, result.stdout
    assert old.is_dir()


def test_making_room_spares_the_pulls_own_staging_vm(
    tmp_path: Path, small_image: BuiltImage, three_images: list[BuiltImage]
) -> None:
    """Abandoned partials go before any cached image, but never the staging VM of the pull
    that is making room (a resumed pull's bytes are what it resumes from)."""
    from tartflow.gc import collect

    store = Store(tmp_path / "store")
    mine, other = (parse_manifest(i.manifest_bytes, i.manifest_digest) for i in (small_image, three_images[0]))
    for image, built in ((mine, small_image), (other, three_images[0])):
        store.put_manifest(image.manifest_digest, built.manifest_bytes)
        Staging(store, image).prepare(built.manifest_bytes)
    report = collect(store, prune.ABANDONED_AFTER, now=time.time() + 2 * prune.ABANDONED_AFTER,
                     keep=mine.manifest_digest)
    assert Staging(store, mine).dir.is_dir()
    assert not Staging(store, other).dir.exists() and report.removed


def test_deletion_refuses_links_and_paths_outside_the_cache(tmp_path: Path) -> None:
    from tartflow.collect import remove_digest_dir

    cache = TartCache(tmp_path / "tart")
    real = _fake_vm(cache, "r.example:5000/acme/a:v1", b"{}", "1", time.time())
    elsewhere = tmp_path / "elsewhere" / ("sha256:" + "2" * 64)
    elsewhere.mkdir(parents=True)
    link = real.parent / ("sha256:" + "3" * 64)
    link.symlink_to(elsewhere)
    assert not remove_digest_dir(cache, link) and elsewhere.is_dir() and link.is_symlink()
    assert not remove_digest_dir(cache, elsewhere) and elsewhere.is_dir()
    assert remove_digest_dir(cache, real) and not real.exists()


def test_looking_for_layers_to_reuse_leaves_access_times_alone(tmp_path: Path, small_image: BuiltImage) -> None:
    """Prune ranks by the digest directory's access time; a pull scanning the cache for layers
    must not read those directories (a listing moves their atime on relatime mounts)."""
    from tartflow.reuse import reuse_local

    cache = TartCache(tmp_path / "tart")
    old = time.time() - 10 * DAY
    vm = _fake_vm(cache, "r.example:5000/acme/old:v1", small_image.manifest_bytes, "1", old)
    os.utime(vm, (old, old + DAY))  # atime before mtime: any listing would move it
    image = parse_manifest(small_image.manifest_bytes, small_image.manifest_digest)
    reuse_local(cache, Staging(Store(tmp_path / "store"), image), image.nvram.digest)
    assert os.stat(vm).st_atime == old
