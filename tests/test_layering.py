"""Guardrails of the package layout (docs/development.md, issue 15): imports only run down the
layers, and the pure core does no file I/O.

* ``bids_app.core`` imports no Nipype, no pybids and no msxplain layer above it (only
  ``bids_app.errors``, ``bids_app.core.plans_allowlist`` and other core modules); only
  ``core/imageio.py`` reads or writes files.
* ``bids_app.interfaces`` imports no workflows and no CLI.
* nothing imports ``bids_app.cli`` except the CLI itself, the entry points and the test harness
  (``bids_app.testing.run_cli``).
* ``bids_app.synth`` and ``bids_app.training`` (data generation, model training) are reached only
  from the ``msxplain-tools`` subcommands and the test harness, never from the BIDS App's run.
* nothing in the app imports ``bids_app.testing``.
* every import runs down :data:`LAYERS` (or stays in its own folder), the modules import each other
  in no circle, and no module is longer than :data:`MAX_LINES` lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bids_app"
CORE_MAY_IMPORT = ("bids_app.errors", "bids_app.core")
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
    tree = ast.parse(path.read_text())
    # `if TYPE_CHECKING:` imports never run: they name types for annotations only
    typing_only = {id(inner) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) ==
                   "TYPE_CHECKING" for inner in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
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

#: the layers, lowest first (docs/architecture.md): a module imports only from its own folder and
#: from folders of a lower layer. ``errors`` and ``progress`` are the leaves every layer may use.
LAYERS = (
    ("", "errors", "progress"),
    ("core",),
    ("model", "formats"),
    ("bids",),
    ("interfaces", "synth"),
    ("workflows", "reports", "training"),
    ("app",),
    ("cli",),
    ("testing", "__main__"),
)
LAYER_OF = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}
MAX_LINES = 600


def _folder(module: str) -> str:
    """``bids_app.core.explain.cam`` -> ``core``; ``bids_app`` -> ``''``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _package_imports(name: str) -> set[str]:
    """The msxplain modules ``name`` imports, each resolved to a module of the package."""
    out = set()
    for imported in _imports(name, MODULES[name]):
        if imported != "bids_app" and not imported.startswith("bids_app."):
            continue
        while imported not in MODULES and "." in imported:  # `from pkg.mod import function`
            imported = imported.rsplit(".", 1)[0]
        if imported != name:
            out.add(imported)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


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


def test_every_folder_has_a_layer():
    assert not sorted({_folder(n) for n in MODULES} - set(LAYER_OF))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_down_the_layers(name):
    mine = _folder(name)
    up = sorted(m for m in _package_imports(name)
                if _folder(m) != mine and LAYER_OF[_folder(m)] >= LAYER_OF[mine])
    assert not up, f"{name} ({mine or 'root'}) imports {up}, which are not below it in LAYERS"


def test_no_import_cycle():
    graph = {name: _package_imports(name) for name in MODULES}
    # a package's __init__ re-exporting its own modules is not a circle of design
    for name in graph:
        if MODULES[name].name == "__init__.py":
            graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    assert not _cycles(graph)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_too_long(name):
    n_lines = len(MODULES[name].read_text().splitlines())
    assert n_lines <= MAX_LINES, f"{MODULES[name]} has {n_lines} lines (at most {MAX_LINES}): split it by concern"


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_a_violation_is_caught(tmp_path):
    """The checks can fail: a core module that imports nipype and opens a file is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import nipype\nfrom ..interfaces import segment\n\ndef f():\n    return open('x').read()\n")
    imports = _imports("bids_app.core.bad", bad)
    assert "nipype" in imports and "bids_app.interfaces" in imports
