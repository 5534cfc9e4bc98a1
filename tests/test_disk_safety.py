"""What reaches a staged or installed disk is what the manifest says, on every local path:
stale bytes of a failed attempt never survive under a zero run, a blob in the store or a layer
in Tart's cache altered after it was verified is caught before it is marked done, a config or
NVRAM blob is placed only if it hashes to its digest, and installing refreshes Tart's LRU
order. Direct tests on ``disk.py``, ``staging.py``, ``reuse.py`` and ``tartcache.py`` over
temporary files: no registry, no Prefect.

Each test here is the one ``scripts/mutations.py`` runs for the safety property it names.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tartflow import checkpoint
from tartflow import pull as core
from tartflow.context import PullContext, PullSettings
from tartflow.disk import ZERO_CHUNK, LayerDecoder, _write_sparse
from tartflow.errors import CorruptLayerError, DigestMismatchError, StoreError
from tartflow.lz4apple import encode_bytes
from tartflow.manifest import Descriptor, DiskLayer, TartImage, parse_manifest
from tartflow.reference import parse_reference
from tartflow.registry.retry import RetryPolicy
from tartflow.reuse import reuse_local
from tartflow.staging import Staging
from tartflow.store import Store
from tartflow.tartcache import TartCache

#: Non-zero bytes, a zero run spanning several chunks, non-zero bytes again.
DATA = os.urandom(150_000) + bytes(5 * ZERO_CHUNK + 1234) + os.urandom(70_000)
STALE = b"\xaa" * len(DATA)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _image(blob: bytes, decoded: bytes) -> TartImage:
    small = Descriptor(mediaType="application/octet-stream", digest=_digest(b"{}"), size=2)
    layer = Descriptor(mediaType="application/vnd.cirruslabs.tart.disk.v2", digest=_digest(blob), size=len(blob))
    return TartImage(_digest(b"manifest"), small, (DiskLayer(layer, 0, len(decoded), _digest(decoded)),), small)


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _sparse_files(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    try:
        return _allocated(probe) < 1024 * 1024
    finally:
        probe.unlink()


# -- stale bytes under a zero run ------------------------------------------------------------

def test_a_dirty_write_clears_stale_bytes_under_zero_runs_and_leaves_holes_holes(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    start = 5  # not chunk aligned: a leading partial chunk too
    with open(disk, "wb") as f:
        f.truncate(start + len(DATA) + 4 * ZERO_CHUNK)
    fd = os.open(disk, os.O_RDWR)
    try:
        os.pwrite(fd, STALE[: 3 * ZERO_CHUNK], 0)  # an earlier attempt reached into the zero run
        allocated_before = _allocated(disk)
        _write_sparse(fd, DATA, start, dirty=True)
        assert os.pread(fd, len(DATA), start) == DATA
        assert os.pread(fd, start, 0) == STALE[:start]  # nothing outside the range touched
        if _sparse_files(tmp_path):
            # Zero chunks over holes were not written: at most the stale part and the
            # non-zero bytes are allocated (plus a block at each edge).
            assert _allocated(disk) <= allocated_before + 150_000 + 70_000 + 4 * 4096
    finally:
        os.close(fd)


def test_a_retried_layer_clears_what_the_failed_attempt_left(tmp_path: Path) -> None:
    """A first attempt that wrote wrong bytes over the whole layer and failed verification
    leaves the layer dirty; the next attempt's disk holds exactly the layer, zero run included."""
    good = encode_bytes(DATA, block_size=65536)
    staging = Staging(Store(tmp_path), _image(good, DATA))
    staging.prepare(b"{}")
    wrong = tmp_path / "wrong.blob"
    wrong.write_bytes(encode_bytes(STALE, block_size=65536))
    with pytest.raises(CorruptLayerError):
        staging.decode(0, wrong)
    assert not staging.layer_done(0)
    assert (staging.dir / "disk.img").read_bytes() == STALE  # the failed attempt's bytes are there
    blob = tmp_path / "good.blob"
    blob.write_bytes(good)
    assert staging.decode(0, blob)
    assert staging.layer_done(0) and (staging.dir / "disk.img").read_bytes() == DATA


def test_a_decoder_restarted_mid_layer_clears_what_it_wrote_before(tmp_path: Path) -> None:
    """A download that starts over (a digest mismatch, a server ignoring Range) re-decodes
    over bytes it wrote itself in this run: they must not survive under the zero run."""
    good = encode_bytes(DATA, block_size=65536)
    image = _image(good, DATA)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(len(DATA))
    fd = os.open(disk, os.O_RDWR)
    try:
        decoder = LayerDecoder(image.disk_layers[0], fd, dirty=False)
        decoder.feed(encode_bytes(STALE, block_size=65536))  # bytes that will not verify
        decoder.reset()
        decoder.feed(good)
        decoder.verify()
    finally:
        os.close(fd)
    assert disk.read_bytes() == DATA


# -- altered after verification ---------------------------------------------------------------

def test_a_stored_blob_altered_after_commit_is_caught_before_the_layer_is_done(tmp_path: Path) -> None:
    good = encode_bytes(DATA, block_size=65536)
    store = Store(tmp_path)
    image = _image(good, DATA)
    digest = image.disk_layers[0].blob.digest
    with store.ingest(digest) as ingest:
        ingest.data.write_bytes(good)
        blob = ingest.commit(len(good), digest)
    altered = bytearray(DATA)
    altered[1000] ^= 0xFF
    blob.write_bytes(encode_bytes(bytes(altered), block_size=65536))  # valid framing, other content
    staging = Staging(store, image)
    staging.prepare(b"{}")
    with pytest.raises(CorruptLayerError, match=r"not .* as the manifest says"):
        staging.decode(0, blob)
    assert not staging.layer_done(0)
    with pytest.raises(StoreError, match="not verified"):
        staging.check_complete()  # nothing to install


def _cache_vm(cache: TartCache, raw: bytes, digest: str, disk: bytes, config: bytes, nvram: bytes) -> Path:
    vm = cache.digest_dir(parse_reference("registry.test/acme/base:v1"), digest)
    vm.mkdir(parents=True)
    (vm / "manifest.json").write_bytes(raw)
    (vm / "disk.img").write_bytes(disk)
    (vm / "config.json").write_bytes(config)
    (vm / "nvram.bin").write_bytes(nvram)
    return vm


def _two_images(tmp_path: Path) -> tuple[bytes, TartImage, bytes, TartImage, bytes, bytes, bytes]:
    """Two manifests sharing one disk layer (a tag that moved): the first is in Tart's cache."""
    layer_blob = encode_bytes(DATA, block_size=65536)
    config, nvram = b'{"os":"darwin"}', os.urandom(4096)
    layers = [
        {"mediaType": "application/vnd.cirruslabs.tart.config.v1", "digest": _digest(config), "size": len(config)},
        {"mediaType": "application/vnd.cirruslabs.tart.disk.v2", "digest": _digest(layer_blob),
         "size": len(layer_blob), "annotations": {
             "org.cirruslabs.tart.uncompressed-size": str(len(DATA)),
             "org.cirruslabs.tart.uncompressed-content-digest": _digest(DATA)}},
        {"mediaType": "application/vnd.cirruslabs.tart.nvram.v1", "digest": _digest(nvram), "size": len(nvram)},
    ]
    stub = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _digest(b"{}"), "size": 2}
    raws = [json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": stub, "layers": layers, "annotations": {"n": str(n)}}).encode() for n in (1, 2)]
    old, new = (parse_manifest(raw, _digest(raw)) for raw in raws)
    return raws[0], old, raws[1], new, layer_blob, config, nvram


def test_a_layer_altered_in_tarts_cache_is_not_copied_into_staging(tmp_path: Path) -> None:
    old_raw, old, new_raw, new, _layer_blob, config, nvram = _two_images(tmp_path)
    cache = TartCache(tmp_path / "tart")
    altered = bytearray(DATA)
    altered[200_000] = 1  # a byte of the zero run, changed after Tart's pull verified it
    vm = _cache_vm(cache, old_raw, old.manifest_digest, bytes(altered), config, nvram)
    staging = Staging(Store(tmp_path / "store"), new)
    staging.prepare(new_raw)
    assert not reuse_local(cache, staging, new.disk_layers[0].blob.digest)
    assert not staging.layer_done(0)
    (vm / "disk.img").write_bytes(DATA)  # the same VM, intact: now it serves the layer
    assert reuse_local(cache, staging, new.disk_layers[0].blob.digest)
    assert staging.layer_done(0) and (staging.dir / "disk.img").read_bytes() == DATA


def test_a_config_altered_in_tarts_cache_is_not_placed(tmp_path: Path) -> None:
    old_raw, old, new_raw, new, _layer_blob, config, nvram = _two_images(tmp_path)
    cache = TartCache(tmp_path / "tart")
    _cache_vm(cache, old_raw, old.manifest_digest, DATA, config.replace(b"darwin", b"DARWIN"), nvram)
    staging = Staging(Store(tmp_path / "store"), new)
    staging.prepare(new_raw)
    assert not reuse_local(cache, staging, new.config.digest)
    assert not (staging.dir / "config.json").exists()
    assert reuse_local(cache, staging, new.nvram.digest)  # the intact NVRAM is taken
    assert (staging.dir / "nvram.bin").read_bytes() == nvram


@pytest.mark.parametrize("name", ["config.json", "nvram.bin"])
def test_a_small_blob_altered_in_the_store_is_never_placed(tmp_path: Path, name: str) -> None:
    """The verify step places config.json and nvram.bin from the store: a blob changed there
    after its download was verified is dropped (the next run fetches it again), not placed."""
    _old_raw, _old, raw, image, _layer_blob, config, nvram = _two_images(tmp_path)
    settings = PullSettings(check_space=False)
    store = Store(tmp_path / "store")

    def no_network(ref: object) -> object:
        raise AssertionError("no download expected")

    ctx = PullContext(settings, store, TartCache(tmp_path / "tart"), RetryPolicy(retry_for=5), no_network)  # type: ignore[arg-type]
    store.put_manifest(image.manifest_digest, raw)
    staging = Staging(store, image)
    staging.prepare(raw)
    desc, data = (image.config, config) if name == "config.json" else (image.nvram, nvram)
    with store.ingest(desc.digest) as ingest:
        ingest.data.write_bytes(data)
        blob = ingest.commit(len(data), desc.digest)
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off
    reference = f"registry.test/acme/vm@{image.manifest_digest}"
    with pytest.raises(StoreError, match="run the same command again"):
        core.verify(ctx, reference, image.manifest_digest, desc.digest)
    assert not (staging.dir / name).exists()
    assert not store.has_blob(desc.digest, desc.size)  # dropped: the next run fetches it again
    with pytest.raises(DigestMismatchError):
        staging.place(name, desc, b"x" * desc.size)


# -- Tart's LRU order --------------------------------------------------------------------------

def _vm_dir(path: Path, seed: int = 1) -> tuple[Path, str]:
    """A staged VM that passes the install's intact check (tartflow/intact.py) and the digest
    its manifest names it by."""
    config, nvram, disk = b'{"seed": %d}' % seed, b"nvram-%d" % seed, bytes([seed]) * 4096

    def blob(media: str, data: bytes, **annotations: str) -> dict[str, object]:
        found = {"mediaType": media, "digest": _digest(data), "size": len(data)}
        return {**found, "annotations": annotations} if annotations else found

    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob("application/vnd.oci.image.config.v1+json", b"{}"),
        "layers": [
            blob("application/vnd.cirruslabs.tart.config.v1", config),
            blob("application/vnd.cirruslabs.tart.disk.v2", b"compressed-%d" % seed, **{
                "org.cirruslabs.tart.uncompressed-size": str(len(disk)),
                "org.cirruslabs.tart.uncompressed-content-digest": _digest(disk)}),
            blob("application/vnd.cirruslabs.tart.nvram.v1", nvram),
        ],
        "annotations": {"org.cirruslabs.tart.uncompressed-disk-size": str(len(disk))},
    }).encode()
    path.mkdir(parents=True)
    for name, data in (("config.json", config), ("disk.img", disk), ("nvram.bin", nvram), ("manifest.json", manifest)):
        (path / name).write_bytes(data)
    return path, _digest(manifest)


def test_install_refreshes_the_access_time_tart_prunes_by(tmp_path: Path) -> None:
    cache = TartCache(tmp_path / "tart")
    ref = parse_reference("registry.test/acme/vm:v1")
    staging, digest = _vm_dir(tmp_path / "tart" / "tartflow" / "staging" / "x")
    os.utime(staging, (1000, os.stat(staging).st_mtime))  # assembled long ago
    before = time.time() - 1
    target = cache.install(ref, digest, staging)
    assert os.stat(target).st_atime >= before
    os.utime(target, (1000, os.stat(target).st_mtime))
    cache.install(ref, digest)  # installed already: a pull of it counts as a use
    assert os.stat(target).st_atime >= before


def test_a_moved_tag_sends_its_old_image_to_the_front_of_the_prune_queue(tmp_path: Path) -> None:
    cache = TartCache(tmp_path / "tart")
    ref = parse_reference("registry.test/acme/vm:v1")
    staged, digest = _vm_dir(tmp_path / "tart" / "s1", seed=1)
    first = cache.install(ref, digest, staged)
    (first / ".explicitly-pulled").touch()  # also pulled by digest: Tart's collection keeps it
    staged, digest = _vm_dir(tmp_path / "tart" / "s2", seed=2)
    second = cache.install(ref, digest, staged)
    assert os.readlink(cache.repo_dir(ref) / "v1") == str(second)
    assert os.stat(first).st_atime == 0 and os.stat(second).st_atime > 0



# -- checkpoint trust -------------------------------------------------------------------------

@pytest.mark.skipif(not checkpoint.possible(), reason="no checkpoints here")
@pytest.mark.parametrize("altered", [False, True], ids=["intact", "decoded-bytes-changed"])
def test_a_checkpoint_is_trusted_only_over_the_decoded_bytes_it_saw(tmp_path: Path, altered: bool) -> None:
    blob = encode_bytes(DATA, block_size=65536)
    image = _image(blob, DATA)
    digest = image.disk_layers[0].blob.digest
    staging = Staging(Store(tmp_path), image)
    staging.prepare(b"{}")
    half = len(blob) // 2
    with staging.decoding(0) as fill:  # a download decoded on the way in, stopped half way
        assert fill is not None
        decoder, received, blob_hash = fill.resume(digest)
        assert received == 0
        decoder.feed(blob[:half])
        blob_hash.update(blob[:half])
        fill.save_checkpoint(digest, half, blob_hash.state())
    if altered:  # the decoded bytes the checkpoint vouches for changed since (a lost write)
        with open(staging.dir / "disk.img", "r+b") as f:
            f.seek(10)
            f.write(bytes([DATA[10] ^ 0xFF]))
    with staging.decoding(0) as fill:
        assert fill is not None
        decoder, received, blob_hash = fill.resume(digest)
        assert received == (0 if altered else half)
        decoder.feed(blob[received:])
        blob_hash.update(blob[received:])
        decoder.verify()
        fill.mark_done()
    assert "sha256:" + blob_hash.hexdigest() == digest
    assert (staging.dir / "disk.img").read_bytes() == DATA


# -- lock discipline --------------------------------------------------------------------------

def _blocked_while_held(hold: Callable[[], AbstractContextManager[object]], work: Callable[[], object]) -> list[object]:
    """Run ``work`` in a thread while ``hold`` is held here; assert it waits for the release."""
    results: list[object] = []
    with hold():
        worker = threading.Thread(target=lambda: results.append(work()))
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and results == [], "went ahead while the lock was held"
    worker.join(60)
    assert not worker.is_alive()
    return results


def test_a_layer_being_written_is_not_written_again_meanwhile(tmp_path: Path) -> None:
    good = encode_bytes(DATA, block_size=65536)
    staging = Staging(Store(tmp_path), _image(good, DATA))
    staging.prepare(b"{}")
    blob = tmp_path / "good.blob"
    blob.write_bytes(good)
    assert _blocked_while_held(lambda: staging.locked("layer-0"), lambda: staging.decode(0, blob)) == [True]
    assert staging.layer_done(0)


def test_install_waits_for_tarts_lock_on_the_host_directory(tmp_path: Path) -> None:
    cache = TartCache(tmp_path / "tart")
    ref = parse_reference("registry.test/acme/vm:v1")
    staging, digest = _vm_dir(tmp_path / "tart" / "s")
    installed = _blocked_while_held(lambda: cache.host_lock(ref.host), lambda: cache.install(ref, digest, staging))
    assert installed == [cache.digest_dir(ref, digest)] and cache.current(ref, digest)
