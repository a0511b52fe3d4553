"""Guardrails of the package layout (docs/development.md, issue 15): imports only run down the
layers, and the pure core does no file I/O.

* ``bids_app.core`` imports no Nipype, no pybids and no msxplain layer above it (only
  ``bids_app.errors``, ``bids_app.model.safety`` and other core modules); only
  ``core/imageio.py`` reads or writes files.
* ``bids_app.interfaces`` imports no workflows and no CLI.
* nothing imports ``bids_app.cli`` except the CLI itself, the entry points and the test harness
  (``bids_app.testing.run_cli``).
* ``bids_app.synth`` and ``bids_app.training`` (data generation, model training) are reached only
  from the ``msxplain-tools`` subcommands and the test harness, never from the BIDS App's run.
* nothing in the app imports ``bids_app.testing``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bids_app"
CORE_MAY_IMPORT = ("bids_app.errors", "bids_app.model.safety", "bids_app.core")
FILE_IO_CALLS = ("open", "load", "save", "read_text", "write_text", "read_bytes", "write_bytes", "to_csv",
                 "read_csv", "to_filename", "ReadImage", "WriteImage", "dump", "savez", "savez_compressed")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (relative imports resolved), at any depth of the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` may name submodules
                out.update(f"{module}.{alias.name}" for alias in node.names)
            else:
                module = node.module or ""
            out.add(module)
    return out


MODULES = _modules()


def test_the_walk_finds_the_package():
    assert "bids_app.core.uncertainty" in MODULES and "bids_app.cli.run" in MODULES
    assert "bids_app.cli.parser" in _imports("bids_app.cli.run", MODULES["bids_app.cli.run"])


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith("bids_app.core")])
def test_core_imports_nothing_above_it(name):
    bad = sorted(m for m in _imports(name, MODULES[name])
                 if m.split(".")[0] in ("nipype", "bids")
                 or (m.startswith("bids_app") and not m.startswith(CORE_MAY_IMPORT)))
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith("bids_app.core") and n != "bids_app.core.imageio"])
def test_core_does_no_file_io(name):
    calls = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            # torch.load/np.load/nib.load/json.dump/...: any module-level load/save/dump is file I/O
            if called in FILE_IO_CALLS and (called in ("open", "read_text", "write_text", "read_bytes",
                                                       "write_bytes", "to_csv", "to_filename") or owner in
                                            ("np", "nib", "torch", "json", "pd", "sitk", "pickle", "nibabel")):
                calls.append(f"{owner + '.' if owner else ''}{called} (line {node.lineno})")
    assert not calls, f"{name} does file I/O: {calls}; read and write in bids_app.core.imageio or an interface"


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith("bids_app.interfaces")])
def test_interfaces_import_no_workflow_and_no_cli(name):
    bad = sorted(m for m in _imports(name, MODULES[name]) if m.startswith(("bids_app.workflows", "bids_app.cli")))
    assert not bad, f"{name} imports {bad}"


def _outside(name: str, *packages: str) -> bool:
    return not any(name == p or name.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("name", [n for n in MODULES if _outside(n, "bids_app.cli", "bids_app.__main__",
                                                                    "bids_app.testing")])
def test_nothing_imports_the_cli(name):
    bad = sorted(m for m in _imports(name, MODULES[name]) if m.startswith("bids_app.cli"))
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", [n for n in MODULES if _outside(n, "bids_app.cli.tools", "bids_app.synth",
                                                                    "bids_app.training", "bids_app.testing")])
def test_synth_and_training_only_from_the_tools(name):
    bad = sorted(m for m in _imports(name, MODULES[name]) if m.startswith(("bids_app.synth", "bids_app.training")))
    assert not bad, f"{name} imports {bad}: generation and training are msxplain-tools subcommands"


@pytest.mark.parametrize("name", [n for n in MODULES if _outside(n, "bids_app.testing")])
def test_the_app_never_imports_the_test_harness(name):
    bad = sorted(m for m in _imports(name, MODULES[name]) if m.startswith("bids_app.testing"))
    assert not bad, f"{name} imports {bad}"


def test_a_violation_is_caught(tmp_path):
    """The checks can fail: a core module that imports nipype and opens a file is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import nipype\nfrom ..interfaces import segment\n\ndef f():\n    return open('x').read()\n")
    imports = _imports("bids_app.core.bad", bad)
    assert "nipype" in imports and "bids_app.interfaces" in imports
