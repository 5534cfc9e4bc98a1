"""A VM being assembled, in the store, until it moves into Tart's cache with one rename.

``staging/<manifest hex>/`` holds exactly what the digest directory will hold (``config.json``,
``disk.img`` created sparse at full size, ``nvram.bin``, ``manifest.json``); bookkeeping lives
beside it in ``staging/<manifest hex>.state/`` so it never reaches Tart's cache:
``layer-<i>.done`` once layer i is decoded and verified, ``layer-<i>.dirty`` while it is being
written (so a retry clears stale bytes), ``layer-<i>.checkpoint-{0,1}`` where a download decoded on
the way in can resume (checkpoint.py), ``clone.json`` when ``disk.img`` started as a clone of a
cached disk (cowbase.py), and one lock per layer and for the whole VM.

Which blobs the staging VMs still need (``staged_blobs``) is read from their manifests here:
they are staging's, not the content store's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import filelock

from . import checkpoint, cowbase, pagecache
from .disk import LayerDecoder, copy_layer, decode_layer
from .errors import CorruptLayerError, DigestMismatchError, StoreError, TartflowError
from .manifest import Descriptor, DiskLayer, TartImage, parse_manifest
from .reference import digest_hex
from .sha256 import Sha256
from .store import Store, atomic_write
from .tartcache import TartCache

__all__ = ["LayerFill", "Staging", "staged_blobs", "staged_images"]


def staged_images(store: Store, *, besides: str | None = None) -> Iterator[TartImage]:
    """The image of every staging VM (a pull in progress) whose manifest reads; ``besides``
    leaves out the staging VM of that manifest digest."""
    skip = digest_hex(besides) if besides else None
    for manifest in (store.root / "staging").glob("*/manifest.json"):
        if manifest.parent.name == skip:
            continue
        try:
            yield parse_manifest(manifest.read_bytes(), "sha256:" + manifest.parent.name)
        except (TartflowError, OSError):  # an unreadable staging manifest protects nothing
            continue


def staged_blobs(store: Store, *, besides: str | None = None) -> set[str]:
    """Digests of every blob a staging VM (a pull in progress) still lists; ``besides``
    leaves out the staging VM of that manifest digest."""
    return {d.digest for image in staged_images(store, besides=besides) for d in image.blobs}


@dataclass
class _Slot:
    fd: int
    dirty: bool
    write_done_marker: Callable[[], None]
    layer: DiskLayer
    done: bool = False

    def mark_done(self) -> None:
        """The layer is written and verified: make its bytes durable, then write its done
        marker, in that order, so a crash never leaves a done marker over bytes that were lost."""
        if not self.done:
            self._make_durable()
            self.write_done_marker()
            self.done = True

    def _make_durable(self) -> None:
        """fdatasync the layer's bytes; its pages, all clean then, leave the page cache (pagecache.py)."""
        _sync_data(self.fd)
        pagecache.drop(self.fd, self.layer.offset, self.layer.uncompressed_size)


class LayerFill:
    """A disk layer being decoded into the staging VM while its blob downloads.

    The download chooses once how the layer resumes: ``decoder()`` when it keeps the
    compressed bytes on disk (a resume feeds them again from the start), or ``resume(blob)``
    when it keeps none and saves checkpoints (checkpoint.py) instead. Once the blob and the
    decoded bytes are verified, ``mark_done()`` makes the layer durable and marks it done, so
    the caller may then drop the compressed bytes.
    """

    def __init__(self, layer: DiskLayer, slot: _Slot, checkpoint_paths: tuple[Path, Path]) -> None:
        self.layer, self._slot, self._paths = layer, slot, checkpoint_paths
        self._newest = 1  # the slot holding the newest checkpoint; the other is written next
        self._decoder: LayerDecoder | None = None

    def decoder(self) -> LayerDecoder:
        """A decoder from the layer's first byte (stale bytes of an unfinished run are cleared)."""
        return self._chosen(LayerDecoder(self.layer, self._slot.fd, dirty=self._slot.dirty))

    def resume(self, blob: str) -> tuple[LayerDecoder, int, Sha256]:
        """A resumable decoder, resumed from the layer's newest whole checkpoint for ``blob``
        when this run can use one (only over bytes an unfinished run left: a dirty layer), with
        the compressed bytes that checkpoint received and their running hash; from the start
        (0 bytes, a new hash, the checkpoints dropped) when not."""
        found = checkpoint.newest(self._paths, blob) if self._slot.dirty else None
        if found is not None:
            slot, saved = found
            try:
                if saved.received > self.layer.blob.size:
                    raise ValueError("checkpoint past the end of the blob")
                blob_hash = Sha256(saved.blob_hash)
                decoder = LayerDecoder(self.layer, self._slot.fd, dirty=self._slot.dirty, resume=saved.layer)
                self._newest = slot
                return self._chosen(decoder), saved.received, blob_hash
            except (ValueError, CorruptLayerError):  # a state this library cannot take, decoded
                # bytes changed since, or pending input that does not decode (never verified)
                self.drop_checkpoints()
        fresh = LayerDecoder(self.layer, self._slot.fd, dirty=self._slot.dirty, resumable=True)
        return self._chosen(fresh), 0, Sha256()

    def _chosen(self, decoder: LayerDecoder) -> LayerDecoder:
        if self._decoder is not None:
            raise RuntimeError("this layer's decoder was already chosen")
        self._decoder = decoder
        return decoder

    def save_checkpoint(self, blob: str, received: int, blob_hash: bytes) -> None:
        """Written over the older of the two slots, so a torn write leaves the newer one."""
        assert self._decoder is not None, "save_checkpoint() needs the decoder from resume()"
        older = 1 - self._newest
        checkpoint.save(self._paths[older], checkpoint.Checkpoint(blob, received, blob_hash, self._decoder.snapshot()))
        self._newest = older

    def drop_checkpoints(self) -> None:
        for path in self._paths:
            path.unlink(missing_ok=True)

    def mark_done(self) -> None:
        """Make the verified layer durable and mark it done (RuntimeError if not verified)."""
        if self._decoder is None or not self._decoder.verified:
            raise RuntimeError("layer decoder has not verified the layer")
        self._slot.mark_done()


class Staging:
    def __init__(self, store: Store, image: TartImage) -> None:
        self.store = store
        self.image = image
        hexdigest = digest_hex(image.manifest_digest)
        self.dir = store.root / "staging" / hexdigest
        self.state = store.root / "staging" / f"{hexdigest}.state"
        self._locks = store.root / "locks" / hexdigest

    @contextmanager
    def locked(self, part: str = "vm") -> Iterator[None]:
        """The whole-VM lock (held while preparing and installing) or one layer's lock.

        Lock files live in ``locks/``, which is never removed while pulls run: deleting a lock
        file another process is about to open is how two pulls of one image would collide.
        """
        self._locks.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(self._locks / f"{part}.lock"):
            yield

    def prepare(self, manifest_raw: bytes, cache: TartCache | None = None) -> None:
        """Create the staging directory with a sparse ``disk.img`` of the full decoded size, or,
        given Tart's ``cache`` on a file system that clones, a clone of the most similar cached
        disk (cowbase.py)."""
        with self.locked():
            self.dir.mkdir(parents=True, exist_ok=True)
            manifest = self.dir / "manifest.json"
            if not manifest.exists():
                atomic_write(manifest, manifest_raw)
            disk = self.dir / "disk.img"
            size = self.image.disk_size
            cloned = cache is not None and not disk.exists() and cowbase.start_from_clone(self, cache)
            if not cloned and (not disk.exists() or disk.stat().st_size != size):
                with open(disk, "ab") as f:
                    f.truncate(size)

    def _marker(self, index: int, kind: str) -> Path:
        return self.state / f"layer-{index}.{kind}"

    def _checkpoints(self, index: int) -> tuple[Path, Path]:
        return self._marker(index, "checkpoint-0"), self._marker(index, "checkpoint-1")

    def layer_done(self, index: int) -> bool:
        return self._marker(index, "done").exists() and (self.dir / "disk.img").exists()

    def evidence(self, digest: str) -> list[Path]:
        """The files whose presence proves blob ``digest`` is verified into this VM: the done
        marker of every disk layer made of it, or the placed config.json / nvram.bin."""
        paths = [self.dir / "disk.img"]
        if digest == self.image.config.digest:
            paths.append(self.dir / "config.json")
        if digest == self.image.nvram.digest:
            paths.append(self.dir / "nvram.bin")
        paths += [self._marker(i, "done") for i, layer in enumerate(self.image.disk_layers)
                  if layer.blob.digest == digest]
        return paths

    def is_verified(self, digest: str) -> bool:
        return all(path.exists() for path in self.evidence(digest))

    def decode(self, index: int, blob: Path) -> bool:
        """Decode disk layer ``index`` from ``blob`` and verify it; False if it was already done."""
        layer = self.image.disk_layers[index]
        return self._fill(index, lambda fd, dirty: decode_layer(blob, layer, fd, dirty=dirty))

    def copy(self, index: int, source: Path, source_offset: int) -> bool:
        """Fill disk layer ``index`` from another VM's decoded disk, verified; False if done."""
        layer = self.image.disk_layers[index]
        return self._fill(index, lambda fd, dirty: copy_layer(source, source_offset, layer, fd, dirty=dirty))

    def fill(self, index: int, write: Callable[[int, bool], None]) -> bool:
        """Fill disk layer ``index`` with ``write(fd, dirty)``, which must raise unless it wrote
        the layer verified (disk.LayerWriter does); False if the layer was already done."""
        return self._fill(index, write)

    @contextmanager
    def decoding(self, index: int) -> Iterator[LayerFill | None]:
        """A fill of disk layer ``index`` to feed while its blob downloads (None if the layer is
        done). The layer counts as done only once the fill's ``mark_done()`` was called."""
        with self._filling(index) as slot:
            yield None if slot is None else LayerFill(self.image.disk_layers[index], slot, self._checkpoints(index))

    def _fill(self, index: int, write: Callable[[int, bool], None]) -> bool:
        with self._filling(index) as slot:
            if slot is None:
                return False
            write(slot.fd, slot.dirty)  # verifies the layer, or raises
            slot.mark_done()
        return True

    @contextmanager
    def _filling(self, index: int) -> Iterator[_Slot | None]:
        """Hold layer ``index`` for writing: its lock, its dirty marker, an open ``disk.img``.
        The holder calls the slot's ``mark_done()`` once the layer is verified; None if already done.

        A layer's bytes reach the disk (fdatasync) before its done marker is written, so a
        crash can never leave a done marker over bytes that were lost; it also spreads the
        write-out over the pull instead of one long fsync before install.
        """
        with self.locked(f"layer-{index}"):
            if self.layer_done(index):
                yield None
                return
            self._require_prepared()
            self.state.mkdir(parents=True, exist_ok=True)
            dirty = self._marker(index, "dirty")
            was_dirty = dirty.exists()
            dirty.touch()

            def write_done_marker() -> None:
                self._marker(index, "done").write_text(self.image.disk_layers[index].uncompressed_digest)
                dirty.unlink()
                for path in self._checkpoints(index):
                    path.unlink(missing_ok=True)

            # Read-write even when clean: a restarted download turns the layer dirty, and clearing
            # stale bytes reads before it writes.
            slot = _Slot(os.open(self.dir / "disk.img", os.O_RDWR), was_dirty, write_done_marker,
                         self.image.disk_layers[index])
            try:
                yield slot
            finally:
                os.close(slot.fd)

    def place(self, name: str, desc: Descriptor, data: bytes) -> None:
        """Put a small blob (config.json, nvram.bin) into the staging VM, checked here against
        its descriptor whatever its source (the store, a VM in Tart's cache): bytes changed
        after they were verified raise DigestMismatchError and are not placed."""
        if len(data) != desc.size or "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest:
            raise DigestMismatchError(f"{name} ({desc.digest[:19]}) does not match its digest", temporary=False)
        self._require_prepared()
        target = self.dir / name
        if not target.exists() or target.stat().st_size != desc.size:
            atomic_write(target, data)

    def _require_prepared(self) -> None:
        if not (self.dir / "disk.img").exists():
            raise StoreError(f"staging area {self.dir} vanished; run the pull again")

    def check_complete(self) -> None:
        """Raise unless every layer is decoded and verified and both small files are in place."""
        missing = [i for i in range(len(self.image.disk_layers)) if not self.layer_done(i)]
        if missing:
            raise StoreError(f"disk layers {missing} are not verified yet; run the pull again")
        for name in ("config.json", "nvram.bin", "manifest.json"):
            if not (self.dir / name).is_file():
                raise StoreError(f"{name} is missing from the staging VM; run the pull again")

    def sync(self) -> None:
        """fsync ``disk.img`` once, before the rename that makes it final, then drop what the
        page cache still holds of it: each layer drops its own range when done, but the kernel
        keeps a page (or a large folio) that reaches past that range."""
        fd = os.open(self.dir / "disk.img", os.O_RDONLY)
        try:
            os.fsync(fd)
            pagecache.drop(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        cowbase.record_verified(self)

    def discard_state(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)

    def abandon(self) -> None:
        """Remove a staging VM that this pull has just created and that holds no downloaded
        byte (a pull refused for space before fetching): a refusal leaves nothing behind."""
        with self.locked():
            shutil.rmtree(self.dir, ignore_errors=True)
            self.discard_state()


def _sync_data(fd: int) -> None:
    """fdatasync where there is one (Linux), else fsync (macOS)."""
    getattr(os, "fdatasync", os.fsync)(fd)
