"""ruff and mypy over the repository, as configured in pyproject.toml; a finding fails the test with its output."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tool: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m <tool> args`` in ``cwd`` (its pyproject.toml configures the tool)."""
    return subprocess.run([sys.executable, "-m", tool, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def _ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return _run("ruff", "check", "--no-cache", "--output-format", "concise", *args, cwd=cwd)


def test_ruff_passes() -> None:
    r = _ruff(".")
    if r.returncode != 0:
        pytest.fail(f"ruff check found problems (fix them, or `ruff check --fix`):\n{r.stdout}{r.stderr}")


def test_mypy_passes() -> None:
    r = _run("mypy")  # files and strictness from [tool.mypy]
    if r.returncode != 0:
        pytest.fail(f"mypy found problems:\n{r.stdout}{r.stderr}")


def test_the_checks_fail_on_a_violation(tmp_path: Path) -> None:
    """The same configuration, on a copy holding one lint and one strict-typing error, fails both tools."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "__init__.py").write_text("")
    bad = tmp_path / "config" / "bad.py"
    bad.write_text('"""A module with an unused import and an unannotated function."""\n\nimport os\n\n\n'
                   "def twice(x):\n    return 2 * x\n")
    r = _ruff("config/bad.py", cwd=tmp_path)
    assert r.returncode == 1 and "F401" in r.stdout, r.stdout + r.stderr
    r = _run("mypy", "--cache-dir", str(tmp_path / ".mypy_cache"), "config/bad.py", cwd=tmp_path)
    assert r.returncode == 1 and "no-untyped-def" in r.stdout, r.stdout + r.stderr
