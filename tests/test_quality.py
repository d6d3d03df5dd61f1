"""The code stays lint-clean and strictly typed: ruff (rules in pyproject.toml) and mypy --strict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_finds_nothing() -> None:
    """ruff check and ruff format --check pass on the whole tree."""
    lint = run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_strict_finds_nothing() -> None:
    """mypy --strict (with the pydantic plugin) passes on every package, the tests and benchmarks."""
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
