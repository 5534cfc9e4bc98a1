"""A real file system of a given kind on a loop device, for copy-on-write tests and benchmarks.

Needs root (losetup, mount). ``loop_mount`` raises ``LoopMountRefused`` with the reason when
the machine refuses (no root, no loop devices, no mkfs), so callers skip saying why; whatever it
set up is always unmounted and detached again, whatever happens inside.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LoopMountRefused", "loop_mount", "used_bytes"]

_MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
}


class LoopMountRefused(RuntimeError):
    pass


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise LoopMountRefused(f"{' '.join(cmd[:2])} failed: {(done.stderr or done.stdout).strip()[:200]}")
    return done.stdout.strip()


@contextmanager
def loop_mount(backing: Path, mountpoint: Path, fstype: str, size: int) -> Iterator[Path]:
    """Make a ``size``-byte ``fstype`` (xfs with reflink, or ext4) in the file ``backing`` and
    mount it at ``mountpoint`` through a loop device."""
    if os.geteuid() != 0:
        raise LoopMountRefused("loop mounts need root")
    for tool in (_MKFS[fstype][0], "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            raise LoopMountRefused(f"{tool} is not installed (scripts/setup.sh installs xfsprogs)")
    with open(backing, "wb") as f:
        f.truncate(size)
    _run([*_MKFS[fstype], str(backing)])
    device = _run(["losetup", "--find", "--show", str(backing)])
    mounted = False
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
        _run(["mount", device, str(mountpoint)])
        mounted = True
        yield mountpoint
    finally:
        if mounted:
            subprocess.run(["umount", str(mountpoint)], capture_output=True, timeout=120)
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60)
        backing.unlink(missing_ok=True)


def used_bytes(path: Path) -> int:
    """Bytes in use on the file system holding ``path`` (after a sync, so delayed allocation
    has happened)."""
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize
