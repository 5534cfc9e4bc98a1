"""Shared pieces of the end-to-end tests: where a pulled VM lands, byte-exact checks, waits."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tartflow import checkpoint
from tests.support.cli import Tartflow
from tests.support.imagebuilder import BuiltImage


def vm_dir(user: Tartflow, host: str, repository: str, digest: str) -> Path:
    return user.oci / host.replace(":", "%3A") / repository / digest


def assert_same_vm(directory: Path, image: BuiltImage) -> None:
    assert (directory / "disk.img").read_bytes() == image.disk_path.read_bytes()
    assert (directory / "config.json").read_bytes() == image.config_json
    assert (directory / "nvram.bin").read_bytes() == image.nvram
    assert (directory / "manifest.json").read_bytes() == image.manifest_bytes


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (Linux ``mincore`` on a shared mapping)."""
    if not sys.platform.startswith("linux"):
        raise NotImplementedError("mincore residency is checked on Linux only")
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as mapped:
        vector = (ctypes.c_ubyte * pages)()
        anchor = ctypes.c_char.from_buffer(mapped)
        try:
            if libc.mincore(ctypes.addressof(anchor), size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            del anchor  # the mapping cannot close while a ctypes view of it lives
        return sum(v & 1 for v in vector) * mmap.PAGESIZE


def assert_pulled(user: Tartflow, host: str, image: BuiltImage) -> None:
    assert_same_vm(vm_dir(user, host, image.repository, image.manifest_digest), image)


def fetchable_bytes(image: BuiltImage) -> int:
    """What a pull moves: every blob but the OCI config stub, which Tart never fetches."""
    return image.total_compressed - int(image.manifest["config"]["size"])


def partial(user: Tartflow, digest: str) -> Path:
    return user.store / "ingest" / "sha256" / digest.split(":")[1] / "data"


def resumable(user: Tartflow, image: BuiltImage, digest: str) -> int:
    """Compressed bytes of blob ``digest`` a next run resumes from: its partial in the store,
    or the newest checkpoint of a disk layer decoded on the way in (whose compressed bytes are
    not kept)."""
    data = partial(user, digest)
    kept = data.stat().st_size if data.exists() else 0
    state = user.store / "staging" / f"{image.manifest_digest.split(':')[1]}.state"
    for i, layer in enumerate(image.disk_layers):
        if layer["digest"] == digest and (found := checkpoint.newest(state.glob(f"layer-{i}.checkpoint-*"), digest)):
            kept = max(kept, found[1].received)
    return kept


def done_layers(user: Tartflow, image: BuiltImage) -> set[int]:
    """Indexes of the disk layers of ``image`` marked done (decoded, verified) in its staging VM."""
    state = user.store / "staging" / f"{image.manifest_digest.split(':')[1]}.state"
    return {int(p.name.split("-")[1].split(".")[0]) for p in state.glob("layer-*.done")}


def wait_for(condition: Callable[[], bool], timeout: float, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            if proc is not None:
                proc.kill()
                _out, err = proc.communicate()
                raise AssertionError(f"condition not reached; tartflow said: {err[-2000:]}")
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)
