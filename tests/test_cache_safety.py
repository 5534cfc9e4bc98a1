"""Tart's cache as an attack surface (issue 18, items 6 and 7): a cached VM counts as current
only when intact, and nothing is written, deleted or even touched through a symbolic link
under ``OCIs/``. Real registry, real files; pulls run the core steps in process (as
test_lifecycle.py does), and once through the CLI for the one-line error."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tartflow import pull as core
from tartflow.errors import StoreError
from tests.checks import assert_same_vm
from tests.support.cli import Tartflow
from tests.support.faultproxy import FaultProxy
from tests.support.imagebuilder import BuiltImage, build_and_push, make_disk
from tests.support.registry import Registry

OLD = 1_000_000_000  # an access time no read would leave in place (relatime: older than mtime)


def _settings(tmp_path: Path) -> core.PullSettings:
    home = tmp_path / "tart"
    return core.PullSettings(insecure=True, tart_home=str(home), store=str(home / "tartflow"), space_margin=0)


def _pull(settings: core.PullSettings, reference: str) -> core.ResolvedImage:
    """resolve, fetch, verify, assemble: what the flow runs, without Prefect."""
    ctx = core.PullContext.build(settings)
    resolved = core.resolve(ctx, reference)
    _finish(ctx, resolved)
    return resolved


def _finish(ctx: core.PullContext, resolved: core.ResolvedImage) -> str:
    for digest in resolved.blobs:
        if not core.fetch(ctx, resolved.reference, resolved.manifest_digest, digest).verified:
            core.verify(ctx, resolved.reference, resolved.manifest_digest, digest)
    return core.assemble(ctx, resolved.reference, resolved.manifest_digest)


def _vm(settings: core.PullSettings, reference: str, digest: str) -> Path:
    return core.PullContext.build(settings).cache.digest_dir(core.parse_reference(reference), digest)


def _outside(tmp_path: Path, *, vm_like: bool = True) -> Path:
    """A folder outside TART_HOME that looks like a VM (so a check by existence accepts it)."""
    folder = tmp_path / "elsewhere" / "junk"
    folder.mkdir(parents=True)
    for name in ("config.json", "disk.img", "nvram.bin") if vm_like else ("precious.txt",):
        (folder / name).write_bytes(b"not yours to touch")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry below ``folder`` with its bytes; then every access time (the folder's too)
    is set to ``OLD``, where any later read of it would move it (relatime)."""
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            found[str(path.relative_to(folder))] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    for path in (*(folder / name for name in found), folder):
        os.utime(path, (OLD, os.lstat(path).st_mtime), follow_symlinks=False)
    return found


def _untouched(folder: Path, before: dict[str, bytes | None]) -> None:
    """Access times first (by lstat, which reads nothing), then names and bytes."""
    for path in (folder, *(folder / name for name in before)):
        assert os.lstat(path).st_atime == OLD, f"{path} was read, written or had its access time set"
    assert {str(p.relative_to(folder)) for p in folder.rglob("*")} == set(before)
    for name, data in before.items():
        if data is not None:
            assert (folder / name).read_bytes() == data


# --- 6. installed means intact ------------------------------------------------------------------


def _served_for(image: BuiltImage, *names: str) -> int:
    """Compressed bytes of the blobs named: 'disk' (every disk layer), 'config', 'nvram'."""
    media = {"disk": "disk.v2", "config": "config.v1", "nvram": "nvram.v1"}
    wanted = {media[n] for n in names}
    unique = {layer["digest"]: layer["size"] for layer in image.layers
              if any(layer["mediaType"].endswith(m) for m in wanted)}
    return sum(unique.values())


def test_zero_length_disk_is_pulled_again_not_reported_current(
    tmp_path: Path, proxy: FaultProxy, small_image: BuiltImage
) -> None:
    settings = _settings(tmp_path)
    ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    _pull(settings, ref)
    vm = _vm(settings, ref, small_image.manifest_digest)
    os.truncate(vm / "disk.img", 0)
    proxy.reset_counters()
    resolved = core.resolve(core.PullContext.build(settings), ref)
    assert not resolved.installed, "a VM with a zero-length disk.img was reported current"
    _finish(core.PullContext.build(settings), resolved)
    assert_same_vm(vm, small_image)
    # config.json and nvram.bin still verified and were reused; the disk came again.
    assert proxy.blob_bytes_served == _served_for(small_image, "disk")
    assert not [p for p in vm.parent.iterdir() if p.name.startswith(".")], "the replaced copy was left behind"


@pytest.mark.parametrize(("damaged", "refetched"), [("nvram.bin", "nvram"), ("config.json", "config")])
def test_damaged_copy_is_replaced_reusing_its_verified_disk(
    tmp_path: Path, proxy: FaultProxy, small_image: BuiltImage, damaged: str, refetched: str
) -> None:
    """Only what no longer verifies crosses the network again: the disk layers come out of the
    damaged copy itself (verified by content digest), which is then replaced by a rename."""
    settings = _settings(tmp_path)
    ref = f"{proxy.host}/{small_image.repository}:{small_image.tag}"
    _pull(settings, ref)
    vm = _vm(settings, ref, small_image.manifest_digest)
    data = bytearray((vm / damaged).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, wrong digest
    (vm / damaged).write_bytes(bytes(data))
    proxy.reset_counters()
    resolved = _pull(settings, ref)
    assert not resolved.installed
    assert_same_vm(vm, small_image)
    assert proxy.blob_bytes_served == _served_for(small_image, refetched)


# --- 7. never through a link ----------------------------------------------------------------


def test_digest_dir_linked_to_junk_is_refused_and_outside_untouched(
    tmp_path: Path, registry: Registry, small_image: BuiltImage
) -> None:
    settings = _settings(tmp_path)
    junk = _outside(tmp_path)
    before = _snapshot(junk)
    vm = _vm(settings, small_image.reference, small_image.manifest_digest)
    vm.parent.mkdir(parents=True)
    vm.symlink_to(junk)
    with pytest.raises(StoreError) as caught:
        _pull(settings, small_image.reference)
    message = str(caught.value)
    assert str(vm) in message and "symbolic link" in message and "\n" not in message, message
    assert vm.is_symlink() and os.readlink(vm) == str(junk)
    assert not (vm.parent / small_image.tag).is_symlink(), "the tag was pointed at the link"
    _untouched(junk, before)


@pytest.mark.task_failures(r"CacheLayoutError: .* is a symbolic link")
def test_linked_namespace_fails_in_one_line_and_nothing_is_written_outside(
    user: Tartflow, registry: Registry, small_image: BuiltImage, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere" / "acme"
    outside.mkdir(parents=True)
    before = _snapshot(outside)
    namespace = user.oci / registry.host.replace(":", "%3A") / "acme"
    namespace.parent.mkdir(parents=True)
    namespace.symlink_to(outside)
    result = user.run("pull", "--insecure", small_image.reference)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(namespace) in lines[0] and "symbolic link" in lines[0], lines
    assert "Traceback" not in result.stderr
    _untouched(outside, before)


def test_outside_non_vm_folder_at_the_digest_path_is_never_deleted(
    tmp_path: Path, registry: Registry, small_image: BuiltImage
) -> None:
    """The namespace is linked outside after the image was fetched and verified, where a folder
    that is no VM sits at the digest path: installing refuses, under Tart's lock, and deletes
    nothing; once the link is gone, the same pull installs without fetching again."""
    settings = _settings(tmp_path)
    ctx = core.PullContext.build(settings)
    resolved = core.resolve(ctx, small_image.reference)
    for digest in resolved.blobs:
        if not core.fetch(ctx, resolved.reference, resolved.manifest_digest, digest).verified:
            core.verify(ctx, resolved.reference, resolved.manifest_digest, digest)
    outside = tmp_path / "elsewhere" / "acme"
    junk = outside / "small" / small_image.manifest_digest
    junk.mkdir(parents=True)
    (junk / "precious.txt").write_bytes(b"keep me")
    namespace = ctx.cache.host_dir(registry.host) / "acme"
    namespace.parent.mkdir(parents=True)
    namespace.symlink_to(outside)
    with pytest.raises(StoreError) as caught:
        core.assemble(ctx, resolved.reference, resolved.manifest_digest)
    assert str(namespace) in str(caught.value) and "\n" not in str(caught.value)
    assert (junk / "precious.txt").read_bytes() == b"keep me"
    assert sorted(p.name for p in outside.rglob("*")) == sorted(["small", small_image.manifest_digest, "precious.txt"])
    namespace.unlink()
    path = core.assemble(ctx, resolved.reference, resolved.manifest_digest)  # nothing was thrown away
    assert_same_vm(Path(path), small_image)


def test_old_tag_link_to_an_outside_folder_gets_no_epoch_access_time(
    tmp_path: Path, registry: Registry, small_image: BuiltImage
) -> None:
    settings = _settings(tmp_path)
    folder = _outside(tmp_path)
    before = _snapshot(folder)
    vm = _vm(settings, small_image.reference, small_image.manifest_digest)
    tag = vm.parent / small_image.tag
    tag.parent.mkdir(parents=True)
    tag.symlink_to(folder)  # an old tag, pointing anywhere
    _pull(settings, small_image.reference)
    assert os.readlink(tag) == str(vm)  # replaced, atomically, by a link to the new image
    assert_same_vm(vm, small_image)
    _untouched(folder, before)


def _tiny(registry: Registry, tmp_path: Path, repository: str, tag: str, seed: int) -> BuiltImage:
    disk = tmp_path / f"{repository.replace('/', '_')}-{tag}.img"
    make_disk(disk, 3 * 1024 * 1024, seed=seed)
    return build_and_push(registry.url, repository, tag, disk, layer_size=1024 * 1024)


def test_tag_then_namespace_of_the_same_name_fails_clearly(
    tmp_path: Path, registry: Registry
) -> None:
    """``acme/vm:x`` is the link ``acme/vm/x``; ``acme/vm/x:latest`` would need that path as a
    directory, and would have landed inside the first VM's digest directory."""
    settings = _settings(tmp_path)
    first = _tiny(registry, tmp_path, "acme/collide", "x", seed=61)
    second = _tiny(registry, tmp_path, "acme/collide/x", "latest", seed=62)
    _pull(settings, first.reference)
    first_vm = _vm(settings, first.reference, first.manifest_digest)
    entries = sorted(p.name for p in first_vm.iterdir())
    with pytest.raises(StoreError) as caught:
        core.resolve(core.PullContext.build(settings), second.reference)  # before anything is fetched
    message = str(caught.value)
    assert f"{registry.host}/acme/collide:x" in message and "tag" in message and "\n" not in message, message
    with pytest.raises(StoreError, match="tag link of"):  # and at install, should the cache change after resolve
        core.PullContext.build(settings).cache.install(core.parse_reference(second.reference), second.manifest_digest)
    assert sorted(p.name for p in first_vm.iterdir()) == entries
    assert_same_vm(first_vm, first)


def test_namespace_then_tag_of_the_same_name_fails_clearly(tmp_path: Path, registry: Registry) -> None:
    settings = _settings(tmp_path)
    first = _tiny(registry, tmp_path, "acme/clash/x", "latest", seed=63)
    second = _tiny(registry, tmp_path, "acme/clash", "x", seed=64)
    _pull(settings, first.reference)
    with pytest.raises(StoreError) as caught:
        core.resolve(core.PullContext.build(settings), second.reference)  # before anything is fetched
    message = str(caught.value)
    assert "is a directory" in message and second.reference in message and "\n" not in message, message
    assert_same_vm(_vm(settings, first.reference, first.manifest_digest), first)
    assert not _vm(settings, second.reference, second.manifest_digest).exists()


# --- the cache's own walkers: collection, removal, listing, access times -----------------------

DIGEST_A, DIGEST_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def _vm_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "disk.img", "nvram.bin"):
        (folder / name).write_bytes(b"x")
    return folder


def test_collection_and_listing_never_walk_a_linked_host_directory(tmp_path: Path) -> None:
    from tartflow.collect import collect_host
    from tartflow.tartcache import TartCache

    cache = TartCache(tmp_path / "tart")
    outside = tmp_path / "elsewhere" / "host"
    _vm_files(outside / "acme" / "vm" / DIGEST_A)  # no tag links it: collection would remove it
    (outside / "acme" / "vm" / "gone").symlink_to(outside / "acme" / "vm" / DIGEST_B)  # a broken tag
    before = _snapshot(outside)
    cache.oci_root.mkdir(parents=True)
    cache.host_dir("r.example:5000").symlink_to(outside)
    assert collect_host(cache, "r.example:5000").removed == []
    assert cache.list() == []
    _untouched(outside, before)


def test_removal_never_passes_through_a_tag_link(tmp_path: Path) -> None:
    """``acme/vm/x`` is a tag link to a digest directory beside it: a digest path below it is
    inside that VM, and is not deleted even though it resolves inside OCIs/."""
    from tartflow.collect import remove_digest_dir
    from tartflow.tartcache import TartCache

    cache = TartCache(tmp_path / "tart")
    repo = cache.host_dir("r.example:5000") / "acme" / "vm"
    nested = _vm_files(repo / DIGEST_A / DIGEST_B)  # a folder inside the first VM's directory
    (repo / "x").symlink_to(repo / DIGEST_A)
    assert not remove_digest_dir(cache, repo / "x" / DIGEST_B)
    assert sorted(p.name for p in nested.iterdir()) == ["config.json", "disk.img", "nvram.bin"]


def test_access_time_is_never_set_through_a_link(tmp_path: Path) -> None:
    from tartflow.tartcache import TartCache

    cache = TartCache(tmp_path / "tart")
    folder = _outside(tmp_path)
    before = _snapshot(folder)
    repo = cache.host_dir("r.example:5000") / "acme" / "vm"
    repo.mkdir(parents=True)
    (repo / "v1").symlink_to(folder)
    with pytest.raises(StoreError, match="symbolic link"):
        cache.mark_accessed(repo / "v1")
    _untouched(folder, before)


def test_a_link_made_while_install_waits_for_tarts_lock_is_refused(
    tmp_path: Path, registry: Registry, small_image: BuiltImage
) -> None:
    """The layout is checked again once Tart's lock is held: a namespace replaced by a link to
    an outside folder while install waited for a ``tart pull`` is refused, nothing deleted."""
    import fcntl
    import threading

    settings = _settings(tmp_path)
    ctx = core.PullContext.build(settings)
    resolved = core.resolve(ctx, small_image.reference)
    for digest in resolved.blobs:
        if not core.fetch(ctx, resolved.reference, resolved.manifest_digest, digest).verified:
            core.verify(ctx, resolved.reference, resolved.manifest_digest, digest)
    host_dir = ctx.cache.host_dir(registry.host)
    host_dir.mkdir(parents=True)
    outside = tmp_path / "elsewhere" / "acme"
    junk = outside / "small" / small_image.manifest_digest
    junk.mkdir(parents=True)
    (junk / "precious.txt").write_bytes(b"keep me")
    fd = os.open(host_dir, os.O_RDONLY)  # a tart pull holding the lock
    fcntl.flock(fd, fcntl.LOCK_EX)
    failures: list[BaseException] = []

    def install() -> None:
        try:
            core.assemble(ctx, resolved.reference, resolved.manifest_digest)
        except BaseException as exc:  # handed to the test thread
            failures.append(exc)

    worker = threading.Thread(target=install)
    try:
        worker.start()
        deadline = time.monotonic() + 60
        while not (host_dir / "acme" / "small").is_dir() and time.monotonic() < deadline:
            time.sleep(0.02)  # install made the namespace and now waits for the lock
        time.sleep(0.5)
        shutil.rmtree(host_dir / "acme")
        (host_dir / "acme").symlink_to(outside)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        worker.join(timeout=60)
    assert len(failures) == 1 and isinstance(failures[0], StoreError), failures
    assert str(host_dir / "acme") in str(failures[0])
    assert (junk / "precious.txt").read_bytes() == b"keep me"
    assert sorted(p.name for p in junk.iterdir()) == ["precious.txt"]


def test_explicitly_pulled_marker_is_never_written_through_a_link(
    tmp_path: Path, registry: Registry, small_image: BuiltImage
) -> None:
    settings = _settings(tmp_path)
    ref = f"{registry.host}/{small_image.repository}@{small_image.manifest_digest}"
    _pull(settings, ref)
    vm = _vm(settings, ref, small_image.manifest_digest)
    outside = tmp_path / "elsewhere" / "notes.txt"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(b"mine")
    os.utime(outside, (OLD, OLD))
    (vm / ".explicitly-pulled").unlink()
    (vm / ".explicitly-pulled").symlink_to(outside)
    with pytest.raises(StoreError, match="symbolic link"):
        _pull(settings, ref)
    assert outside.read_bytes() == b"mine" and os.lstat(outside).st_mtime == OLD
