"""The layer contract (pyproject.toml [tool.importlinter]) and no import cycles, imports inside functions included."""
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_layers_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("scoresde", cache_dir=None)
    cycles = []
    for importer in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(importer):
            if imported == importer or imported.startswith(importer + ".") or importer.startswith(imported + "."):
                continue  # a package's __init__ and its own modules: re-exports, not a cycle of design
            back = graph.find_shortest_chain(importer=imported, imported=importer, as_packages=False)
            if back is not None:
                cycles.append(" -> ".join((importer,) + back))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_cycle_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The graph counts a function-level import, the form that hid the old train <-> families cycle."""
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyc", cache_dir=None)
    assert graph.find_shortest_chain(importer="cyc.b", imported="cyc.a", as_packages=False) == ("cyc.b", "cyc.a")
