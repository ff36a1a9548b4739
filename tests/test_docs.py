"""The documentation builds with no warning (as CI builds it: `make test` runs this), and the API
reference covers every module of the package, so a new module cannot be left out of it."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "scoresde"

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")


def _modules() -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:  # the top-level package itself is the index page, not an API block
            names.add(".".join(parts))
    return names


def test_docs_build_strict_without_warnings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "WARNING" not in out, out
    assert (tmp_path / "site" / "api" / "core.html").exists()


def test_every_module_has_an_api_block():
    documented = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: (scoresde[\w.]*)\s*$", page.read_text(), flags=re.M))
    missing = sorted(_modules() - documented)
    assert not missing, f"modules with no '::: module' block under docs/api/: {missing}"
    stale = sorted(m for m in documented if m != "scoresde" and m not in _modules())
    assert not stale, f"docs/api/ names modules that do not exist: {stale}"
