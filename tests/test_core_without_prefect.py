"""The core package never imports Prefect: tasks and flows are thin layers over it."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import tartflow


def test_every_core_module_imports_without_prefect() -> None:
    modules = [m.name for m in pkgutil.walk_packages(tartflow.__path__, "tartflow.")]
    assert "tartflow.cli" in modules and "tartflow.pull" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core modules pulled in Prefect: {out.stdout[:300]}"
