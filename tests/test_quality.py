"""The code stays lint-clean and strictly typed: ruff (rules in pyproject.toml) and mypy --strict."""

from __future__ import annotations

import ast
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


#: What each package may import of the project (docs/architecture.md, "Layers and imports"); no import
#: goes upward. ``molo`` is the top and may import everything.
ALLOWED_IMPORTS = {
    "contract": set(),
    "accounting": set(),
    "network": {"contract", "accounting"},
    "firmware_stub": {"contract"},
    "simulator": {"contract", "accounting", "network", "firmware_stub"},
    "backend": {"contract", "accounting", "network"},
}
#: Where a package reaches further, and why: running a researcher's experiment is this folder's job.
EXCEPTIONS = {"backend/experiments": {"simulator"}}


def project_imports(path: Path) -> set[str]:
    """The project's top-level packages that ``path`` imports (absolute imports, anywhere in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return {name.split(".")[0] for name in names} & {*ALLOWED_IMPORTS, "molo"}


def test_no_import_goes_upward() -> None:
    """Every module of each package imports only the packages below it: the production backend does not
    import the simulator (the network's geography is the ``network`` package's), the firmware only the
    contract, the ground floor nothing above it."""
    wrong: list[str] = []
    for package, allowed in ALLOWED_IMPORTS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            extra = next((more for where, more in EXCEPTIONS.items() if relative.startswith(f"{where}/")), set())
            wrong.extend(f"{relative} imports {t}" for t in sorted(project_imports(path) - allowed - extra - {package}))
    assert wrong == []
    assert project_imports(ROOT / "backend" / "impact" / "service.py") >= {"network"}  # the check sees imports
