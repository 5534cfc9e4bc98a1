"""The safety-mutation table cannot rot unnoticed: every entry's ``old`` text is in its file
exactly once and every test it names exists (``scripts/mutations.py`` refuses to run otherwise,
but it runs on demand; this runs in the suite). Two entries had gone stale this way between
runs: one after a rename in ``tartflow/disk.py``, one after its test was merged into another."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutations_script", ROOT / "scripts" / "mutations.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_every_entry_matches_the_code_and_names_tests_that_exist() -> None:
    script = _script()
    table = script.load_table()
    assert len(table) >= 50
    assert script.stale_entries(table, ROOT) == []


def test_a_renamed_test_makes_an_entry_stale(tmp_path: Path) -> None:
    script = _script()
    entry = next(m for m in script.load_table() if "::" in m.tests[0])
    test_file, _, test = entry.tests[0].partition("::")
    (tmp_path / entry.file).parent.mkdir(parents=True)
    (tmp_path / entry.file).write_text((ROOT / entry.file).read_text())
    (tmp_path / test_file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / test_file).write_text((ROOT / test_file).read_text().replace(f"def {test.split('[')[0]}(", "def renamed("))
    assert [line for line in script.stale_entries([entry], tmp_path) if "has no test" in line]
