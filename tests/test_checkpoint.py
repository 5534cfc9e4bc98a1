"""Resuming a layer decoded on the way in: SHA-256 states that survive the process, and the
checkpoint files that carry them (whole or ignored, this boot only)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from tartflow import checkpoint, sha256
from tartflow.disk import LayerState
from tartflow.lz4apple import DecoderState

needs_native = pytest.mark.skipif(not sha256.available(), reason="no native SHA-256 library passed the self-test")


@needs_native
@pytest.mark.parametrize("seed", range(4))
def test_a_saved_and_restored_state_gives_hashlibs_digest(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(3_000_000)
    cuts = sorted(rng.sample(range(1, len(data)), 5))
    hasher, done = sha256.Sha256(), 0
    for cut, kind in zip([*cuts, len(data)], [bytes, bytearray, memoryview, bytes, memoryview, bytearray], strict=True):
        hasher.update(kind(data[done:cut]))
        assert hasher.hexdigest() == hashlib.sha256(data[:cut]).hexdigest()  # a digest does not end it
        hasher, done = sha256.Sha256(hasher.state()), cut  # as a later process would
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()


@needs_native
def test_a_state_from_another_library_is_refused() -> None:
    state = sha256.Sha256().state()
    kind, _, raw = state.partition(b":")
    with pytest.raises(ValueError):
        sha256.Sha256(b"other-" + kind + b":" + raw)
    with pytest.raises(ValueError):
        sha256.Sha256(state[:-1])


def _checkpoint(pending: bytes = b"\x01" * 1000) -> checkpoint.Checkpoint:
    state = DecoderState(offset=5000, decoded=70_000, stored_left=0, pending=pending)
    return checkpoint.Checkpoint("sha256:" + "ab" * 32, 5000 + len(pending), b"blob-state",
                                 LayerState(state, b"decoded-state"))


@pytest.mark.skipif(checkpoint.boot_id() is None, reason="the boot cannot be told here")
def test_checkpoint_round_trip_and_every_reason_to_ignore_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slot = tmp_path / "layer-0.checkpoint-0"
    saved = _checkpoint()
    checkpoint.save(slot, saved)
    assert checkpoint.load(slot, saved.blob) == saved
    assert checkpoint.load(slot, "sha256:" + "cd" * 32) is None  # another blob's
    checkpoint.save(slot, _checkpoint(pending=b""))  # shorter over longer: stale bytes follow it
    assert checkpoint.load(slot, saved.blob) == _checkpoint(pending=b"")
    checkpoint.save(slot, saved)
    raw = slot.read_bytes()
    for torn in (raw[: len(raw) // 2], raw[:-1], raw[:20]):  # a kill during the pwrite
        slot.write_bytes(torn)
        assert checkpoint.load(slot, saved.blob) is None
    flipped = bytearray(raw)
    flipped[-10] ^= 1
    slot.write_bytes(bytes(flipped))
    assert checkpoint.load(slot, saved.blob) is None
    slot.write_bytes(raw)
    monkeypatch.setattr(checkpoint, "boot_id", lambda: "another boot")  # the page cache is gone
    assert checkpoint.load(slot, saved.blob) is None
