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


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def _run(code: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_the_examples_run(page, tmp_path):
    blocks = _python_blocks(ROOT / page)
    assert blocks, f"{page} has no python example"
    for code in blocks:
        _run(code, tmp_path)


def test_the_recipes_run(tmp_path):
    """Every recipe block in one fresh process (they register into the global registries), then the new
    SDE, loss, sampler and family are used as the recipes say they can be."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "moons.yaml").write_text((ROOT / "configs" / "moons.yaml").read_text())
    check = """
import torch
from scoresde import ring, sample
from scoresde.core.sde import SDES
from scoresde.learning.losses import LOSSES
sde, data = SDES["constant_vp"](beta=8.0), ring()
calls = []
score = data.score_fn(sde)
x = sample(sde, lambda x, t: calls.append(1) or score(x, t), (256, 2), method="midpoint", nfe=21, dtype=torch.float64)
assert len(calls) == 21 and torch.isfinite(x).all()
g = torch.Generator().manual_seed(0)
x0 = data.sample(2048, generator=g)
t = torch.full((2048,), 0.3, dtype=torch.float64)
z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
exact = LOSSES["x0"](score, sde, x0, t=t, noise=z).mean()
assert exact < LOSSES["x0"](lambda x, t: score(x, t) + 0.1, sde, x0, t=t, noise=z).mean()
assert x.shape == (256, 2)
from scoresde.core.errors import InvalidValueError
from scoresde.running.finetune import method_options
for bad, words in ((dict(beta=1.0), "no KL term"), (dict(top=2.0), "top must be in (0, 1]"), (dict(tops=0.2), "'tops'")):
    try:
        method_options("raft", **bad)
        raise AssertionError(f"{bad} accepted")
    except InvalidValueError as err:
        assert words in str(err), err
"""
    _run("\n".join(_python_blocks(ROOT / "docs" / "recipes.md")) + check, tmp_path)


# file names the pages mention that are not repository paths: a run folder's file, the design's old modules
NOT_PATHS = {"config.yaml", "data.yaml", "discrete.py", "families.py", "schedules.json", "eval.json"}


def test_the_files_the_pages_name_exist():
    """Every `path.py` / `.md` / `.yaml` the pages name exists (from the root, src/ or src/scoresde/), so a moved
    test or module leaves no stale pointer in the docs."""
    stale = []
    for page in sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]:
        for name in re.findall(r"`([\w./-]+\.(?:py|md|yaml|toml|json))`", page.read_text()):
            if name not in NOT_PATHS and not any((base / name).exists() for base in (ROOT, ROOT / "src", PACKAGE)):
                stale.append(f"{page.relative_to(ROOT)}: {name}")
    assert not stale, stale
