"""A pull a newcomer can run on any machine, offline: a real registry on loopback, a small
synthetic Tart image pushed to it, then ``tartflow pull`` into ``$TART_HOME`` as a user would.

    python -m tests.support.demo [--size-mib 256]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.imagebuilder import build_and_push, make_disk
from tests.support.registry import start_registry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="disk size of the demo image")
    args = parser.parse_args()
    tartflow = Path(sys.executable).with_name("tartflow")
    with tempfile.TemporaryDirectory(prefix="tartflow-demo-") as tmp, start_registry(Path(tmp) / "registry") as registry:
        disk = Path(tmp) / "disk.img"
        print(f"demo: building a {args.size_mib} MiB Tart image and pushing it to {registry.host}", flush=True)
        make_disk(disk, args.size_mib * 1024 * 1024, seed=42)
        image = build_and_push(registry.url, "demo/macos", "latest", disk, layer_size=64 * 1024 * 1024)
        print(f"demo: tartflow pull --insecure {image.reference}", flush=True)
        pulled = subprocess.run([str(tartflow), "pull", "--insecure", image.reference])
        if pulled.returncode:
            return pulled.returncode
        subprocess.run([str(tartflow), "list"], check=True)
        print("demo: pulling again (already cached: moves no blob bytes)", flush=True)
        return subprocess.run([str(tartflow), "pull", "--insecure", image.reference]).returncode


if __name__ == "__main__":
    sys.exit(main())
