"""The package declares every third-party module it imports, so `pip install .` runs `ollm serve`."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ollm", "workers", "server", "cli")


def _imported_modules() -> dict[str, set[str]]:
    """Top-level module -> the files importing it, over every module the package ships."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(spec).name) for spec in project["dependencies"]}


def test_every_third_party_import_is_a_declared_dependency() -> None:
    distributions = packages_distributions()
    declared = _declared()
    undeclared = {}
    for module, files in _imported_modules().items():
        if module in sys.stdlib_module_names or module in PACKAGES:
            continue
        owners = {canonicalize_name(d) for d in distributions.get(module, [])}
        if not owners:
            undeclared[module] = f"no installed distribution provides it (imported by {sorted(files)})"
        elif not owners & declared:
            undeclared[module] = f"provided by {sorted(owners)}, imported by {sorted(files)}"
    assert not undeclared, f"add these to [project].dependencies in pyproject.toml: {undeclared}"


def test_the_scan_sees_a_module_the_package_imports_only_from_its_server() -> None:
    # openai is imported by server/openai/** alone; the scan must find it there or it proves nothing.
    assert "server/openai/common.py" in _imported_modules()["openai"]
