"""Copy-on-write refresh (issue 15): a refresh clones the most similar cached disk and writes
only what changed, on a real XFS-with-reflink loop mount; tmpfs (no clones) takes today's path.

Pulls run through the core steps in this process (no Prefect: the flow layer adds nothing here)
against the session's real registry.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tartflow import cowbase
from tartflow.fetch import FetchResult
from tartflow.pull import PullContext, PullSettings, ResolvedImage, assemble, fetch, resolve, verify
from tests.support.imagebuilder import BuiltImage, build_and_push, make_disk
from tests.support.loopfs import LoopMountRefused, loop_mount, used_bytes
from tests.support.registry import Registry

LAYER = 4 * 1024 * 1024
LAYERS = 8
CHANGED, ZEROED = 2, 5


@dataclass
class Versions:
    v1: BuiltImage
    v2: BuiltImage


@dataclass
class Pulled:
    resolved: ResolvedImage
    fetched: list[FetchResult]
    path: Path


@pytest.fixture(scope="module")
def versions(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Versions:
    """v1, then v2 with layer CHANGED rewritten (random bytes) and layer ZEROED all zeros."""
    work = tmp_path_factory.mktemp("cow-images")
    disk1, disk2 = work / "v1.img", work / "v2.img"
    make_disk(disk1, LAYERS * LAYER, seed=7)
    with open(disk1, "r+b") as f:  # a layer with data everywhere, so zeroing it is visible
        f.seek(ZEROED * LAYER)
        f.write(os.urandom(LAYER))
    disk2.write_bytes(disk1.read_bytes())
    with open(disk2, "r+b") as f:
        f.seek(CHANGED * LAYER)
        f.write(os.urandom(LAYER))
        f.seek(ZEROED * LAYER)
        f.write(bytes(LAYER))
    v1 = build_and_push(registry.url, "acme/cow", "v1", disk1, layer_size=LAYER)
    v2 = build_and_push(registry.url, "acme/cow", "v2", disk2, layer_size=LAYER)
    return Versions(v1, v2)


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    try:
        with loop_mount(tmp_path / "xfs.img", tmp_path / "xfs", "xfs", 400 * 1024 * 1024) as mount:
            yield mount
    except LoopMountRefused as exc:
        pytest.skip(f"no XFS reflink loop mount here: {exc}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def settings(home: Path) -> PullSettings:
    return PullSettings(insecure=True, tart_home=str(home), store=str(home / "tartflow"), space_margin=0)


def pull(home: Path, reference: str) -> Pulled:
    s = PullContext.build(settings(home))
    resolved = resolve(s, reference)
    fetched = [fetch(s, resolved.reference, resolved.manifest_digest, d) for d in resolved.blobs]
    for digest in resolved.blobs:
        verify(s, resolved.reference, resolved.manifest_digest, digest)
    return Pulled(resolved, fetched, Path(assemble(s, resolved.reference, resolved.manifest_digest)))


def by_digest(image: BuiltImage) -> str:
    return f"{image.host}/{image.repository}@{image.manifest_digest}"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_hole(path: Path, offset: int, length: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:
        return exc.errno == errno.ENXIO  # no data from offset to the end of the file
    finally:
        os.close(fd)


def zero_chunk_in(disk: Path, offset: int, length: int, chunk: int = 64 * 1024) -> int:
    """An offset inside an aligned all-zero ``chunk`` of ``disk[offset:offset+length]``."""
    data = disk.read_bytes()[offset:offset + length]
    for start in range(0, length, chunk):
        if not any(data[start:start + chunk]):
            return offset + start + 100
    raise AssertionError("the test disk has no zero run in this layer")


def assert_refresh_exact(v1_dir: Path, v1_before: str, v2_dir: Path, versions: Versions) -> None:
    assert (v2_dir / "disk.img").read_bytes() == versions.v2.disk_path.read_bytes()
    assert (v2_dir / "manifest.json").read_bytes() == versions.v2.manifest_bytes
    assert is_hole(v2_dir / "disk.img", ZEROED * LAYER, LAYER)
    assert sha(v1_dir / "disk.img") == v1_before == hashlib.sha256(versions.v1.disk_path.read_bytes()).hexdigest()


def test_refresh_on_reflink_clones_and_writes_only_what_changed(xfs: Path, versions: Versions) -> None:
    home = xfs / "tart"
    first = pull(home, by_digest(versions.v1))
    assert first.resolved.cloned == 0
    v1_before = sha(first.path / "disk.img")
    used = used_bytes(xfs)

    second = pull(home, versions.v2.reference)

    growth = used_bytes(xfs) - used
    assert_refresh_exact(first.path, v1_before, second.path, versions)
    assert second.resolved.clone_base == str(first.path)
    assert second.resolved.cloned == (LAYERS - 2) * LAYER  # all but the changed and the zeroed layer
    assert sum(r.fetched for r in second.fetched) < 2 * LAYER  # only the changed layer (random) travels
    # About the changed layer: no copy of the shared ones, nothing for the zeroed one.
    assert 0.9 * LAYER <= growth <= 1.1 * LAYER + 1024 * 1024, growth
    report = cowbase.refresh_report(second.resolved.cloned, second.resolved.cloned_blobs, second.fetched,
                                    second.path / "disk.img")
    assert report.cloned == (LAYERS - 2) * LAYER and report.copied == 0
    assert report.fetched == sum(r.fetched for r in second.fetched) > 0
    assert report.net_new is not None and LAYER <= report.net_new <= LAYER + 256 * 1024, report.net_new


def test_without_clones_the_refresh_copies_as_before(tmpfs: Path, versions: Versions) -> None:
    home = tmpfs / "tart"
    first = pull(home, by_digest(versions.v1))
    v1_before = sha(first.path / "disk.img")
    used = used_bytes(tmpfs)

    second = pull(home, versions.v2.reference)

    assert_refresh_exact(first.path, v1_before, second.path, versions)
    assert second.resolved.cloned == 0 and second.resolved.clone_base == ""
    report = cowbase.refresh_report(second.resolved.cloned, second.resolved.cloned_blobs, second.fetched,
                                    second.path / "disk.img")
    assert report.cloned == 0 and report.copied == sum(d["size"] for i, d in enumerate(versions.v2.disk_layers)
                                                      if i not in (CHANGED, ZEROED))  # copied from v1, not fetched
    allocated = (second.path / "disk.img").stat().st_blocks * 512
    assert used_bytes(tmpfs) - used >= 0.95 * allocated > 4 * LAYER  # a full second copy, as today


_KILLED_AFTER_RESOLVE = """
import os, signal, sys
from tartflow.pull import PullContext, PullSettings, resolve
home = sys.argv[1]
r = resolve(PullContext.build(PullSettings(insecure=True, tart_home=home, store=home + "/tartflow", space_margin=0)), sys.argv[2])
print(r.cloned, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_refresh_killed_after_the_clone_resumes_byte_exact(
    xfs: Path, versions: Versions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clone is not trusted blindly: a cloned layer whose bytes are not what its digest says
    (a torn clone, a base changed under it) is filled another way on resume."""
    monkeypatch.setenv("TARTFLOW_COW_VERIFY", "rehash")
    home = xfs / "tart"
    first = pull(home, by_digest(versions.v1))
    v1_before = sha(first.path / "disk.img")
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_RESOLVE, str(home), versions.v2.reference],
                            capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert killed.returncode == -9, killed.stderr
    assert int(killed.stdout) == (LAYERS - 2) * LAYER
    staged = home / "tartflow" / "staging" / versions.v2.manifest_digest.split(":")[1]
    state = staged.with_name(staged.name + ".state")
    assert json.loads((state / "clone.json").read_text())["layers"] == [0, 1, 3, 4, 6, 7]
    assert not list(state.glob("layer-*.done"))  # re-hashed, not yet verified
    # The clone is not what its provenance claims, under a zero run of layer 1: only a rewrite
    # that treats the cloned layer as dirty clears it.
    spot = zero_chunk_in(versions.v2.disk_path, LAYER, LAYER)
    with open(staged / "disk.img", "r+b") as f:
        f.seek(spot)
        f.write(b"\xff")

    resumed = pull(home, versions.v2.reference)

    assert_refresh_exact(first.path, v1_before, resumed.path, versions)
    assert is_hole(resumed.path / "disk.img", spot - 100, 64 * 1024)  # cleared by punching, not zeros
    layer1 = versions.v2.disk_layers[1]["digest"]
    assert [r.reused for r in resumed.fetched if r.digest == layer1] == [versions.v2.disk_layers[1]["size"]]


def test_a_base_written_since_it_was_verified_is_rehashed_not_trusted(xfs: Path, versions: Versions) -> None:
    home = xfs / "tart"
    first = pull(home, by_digest(versions.v1))
    with open(first.path / "disk.img", "r+b") as f:  # someone wrote into the cached image
        f.seek(3 * LAYER + 777)
        byte = f.read(1)
        f.seek(3 * LAYER + 777)
        f.write(bytes([byte[0] ^ 0xFF]))

    second = pull(home, versions.v2.reference)

    assert (second.path / "disk.img").read_bytes() == versions.v2.disk_path.read_bytes()
    layer3 = versions.v2.disk_layers[3]["digest"]
    assert [r.fetched for r in second.fetched if r.digest == layer3] == [versions.v2.disk_layers[3]["size"]]


def test_the_base_is_the_cached_vm_sharing_most_bytes_and_needs_a_disk(tmp_path: Path, versions: Versions) -> None:
    """Any cached image may be the base, not only the tag's previous version; an entry without
    ``disk.img`` (a stacked image) is stepped over however much it shares."""
    from tartflow.manifest import parse_manifest
    from tartflow.tartcache import TartCache

    cache = TartCache(tmp_path / "tart")
    repo = cache.oci_root / "127.0.0.1%3A5000" / "acme"

    def entry(name: str, digest: str, manifest: bytes, *, disk: bool = True) -> Path:
        vm = repo / name / digest
        vm.mkdir(parents=True)
        (vm / "manifest.json").write_bytes(manifest)
        for file in ("config.json", "nvram.bin", *(("disk.img",) if disk else ())):
            (vm / file).write_bytes(b"")
        return vm

    v2 = parse_manifest(versions.v2.manifest_bytes, versions.v2.manifest_digest)
    older = entry("base", versions.v1.manifest_digest, versions.v1.manifest_bytes)
    entry("stacked", "sha256:" + "1" * 64, versions.v2.manifest_bytes, disk=False)
    chosen = cowbase.choose_base(cache, v2)
    assert chosen is not None and chosen.path == older and chosen.layers == (0, 1, 3, 4, 6, 7)
    twin = entry("twin", "sha256:" + "2" * 64, versions.v2.manifest_bytes)
    chosen = cowbase.choose_base(cache, v2)
    assert chosen is not None and chosen.path == twin and chosen.shared == LAYERS * LAYER


def test_a_trusted_clone_killed_before_any_layer_resumes_byte_exact(xfs: Path, versions: Versions) -> None:
    """Trusted base: cloned layers were marked done only after the clone was durable, so the
    resumed pull fetches nothing but the changed layer and ends byte-exact."""
    home = xfs / "tart"
    first = pull(home, by_digest(versions.v1))
    v1_before = sha(first.path / "disk.img")
    env = {k: v for k, v in os.environ.items() if k != "TARTFLOW_COW_VERIFY"}
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_RESOLVE, str(home), versions.v2.reference],
                            capture_output=True, text=True, timeout=120, env=env)
    assert killed.returncode == -9, killed.stderr

    resumed = pull(home, versions.v2.reference)

    assert_refresh_exact(first.path, v1_before, resumed.path, versions)
    cloned = {versions.v2.disk_layers[i]["digest"] for i in range(LAYERS) if i not in (CHANGED, ZEROED)}
    fetched = {r.digest for r in resumed.fetched if r.fetched}
    assert versions.v2.disk_layers[CHANGED]["digest"] in fetched and not fetched & cloned
