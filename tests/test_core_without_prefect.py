"""The core package never imports Prefect, nor the layers above it (``flows``, ``tasks``,
``deployments``): checked on the import graph of every file under ``tartflow/``, import
statements and ``importlib.import_module`` / ``__import__`` string arguments alike, and on
what importing every core module actually loads. The ``tartflow`` command's Prefect-free
answers (``list``, usage errors) are checked the same way."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tartflow

FORBIDDEN = ("prefect", "flows", "tasks", "deployments")
CORE = Path(tartflow.__file__).parent


def _module_of(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """Every module name ``source`` (the text of ``module``) imports: ``import`` and
    ``from`` statements (relative ones resolved), and string arguments to
    ``importlib.import_module`` / ``import_module`` / ``__import__``, with their line."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
            else:
                yield node.lineno, node.module or ""
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    yield node.lineno, first.value
                else:  # a computed name cannot be checked: the core has no reason for one
                    yield node.lineno, f"<computed name: {ast.unparse(first)}>"


def forbidden_imports(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module_of(path, root)
        for line, name in imported_names(path.read_text(), module, path.name == "__init__.py"):
            if name.startswith("<computed") or name.split(".")[0] in FORBIDDEN:
                found.append(f"{path.relative_to(root.parent)}:{line} imports {name}")
    return found


def test_no_core_file_imports_prefect_or_the_layers_above() -> None:
    assert len(list(CORE.rglob("*.py"))) > 20  # the walk sees the whole core, subpackages included
    found = forbidden_imports(CORE)
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("code", [
    "import prefect",
    "from prefect.tasks import task",
    "from flows import run",
    "import tasks.pull as t",
    "from deployments.fleet import main",
    "import importlib\nimportlib.import_module('flows.run')",
    "from importlib import import_module\nimport_module('prefect')",
    "__import__('tasks.pull')",
    "import importlib\nname = 'flows.run'\nimportlib.import_module(name)",
])
def test_the_check_sees_every_kind_of_import(tmp_path: Path, code: str) -> None:
    package = tmp_path / "fakecore"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("from . import sibling\nimport os\n" + code + "\n")
    found = forbidden_imports(package)
    assert len(found) == 1, found


def test_relative_imports_resolve_inside_the_core() -> None:
    names = [name for _, name in imported_names("from . import cancel\nfrom ..x import y\n", "tartflow.registry.auth")]
    assert names == ["tartflow.registry", "tartflow.x"]
    names = [name for _, name in imported_names("from .errors import E\n", "tartflow", is_package=True)]
    assert names == ["tartflow.errors"]


def test_every_core_module_imports_without_prefect() -> None:
    modules = [m.name for m in pkgutil.walk_packages(tartflow.__path__, "tartflow.")]
    assert "tartflow.pull" in modules and "tartflow.context" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core modules pulled in: {out.stdout[:300]}"


@pytest.mark.parametrize("argv", [["list"], ["pull", "not a reference"], ["pull", "--concurrency", "0", "a/b"]])
def test_the_command_answers_list_and_usage_errors_without_prefect(tmp_path: Path, argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from flows.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "loaded = [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')]\n"
        "print('CODE', code, 'PREFECT', len(loaded), file=sys.stderr)\n"
    )
    env = {"TART_HOME": str(tmp_path / "tart"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent, timeout=60)
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"CODE {0 if argv == ['list'] else 2} PREFECT 0", out.stderr
